"""Per-platform formulations of a computation, resolved when it is traced if the caller knows the
platform it compiles for.

Some layers have a formulation that runs faster on CPU (batch norm's sums and gradient, max
pooling's gradient: cnnlab.layers.norm, cnnlab.layers.pool). `lax.platform_dependent` picks it for
the platform a computation is compiled for, but it traces every branch and differentiates a
conditional: GoogLeNet's train step took 11.1 s to trace that way and takes 4.4 s now
(bench/README.md, "Fusion emitters off in tests, and steps traced for their platform"). Code that
compiles for a known platform (the train and evaluation steps, cnnlab.parallel, which knows its
mesh) wraps the function it compiles in `traced_for(platform, fn)`, and `platform_dependent` then
traces the one branch that platform runs. A function traced without it, by a user's own jit, gets
`lax.platform_dependent`'s choice: the same values either way.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Callable

from jax import lax

# The platform of the computation being traced ('cpu', 'gpu', 'tpu'), None where unknown.
_target: contextvars.ContextVar[str | None] = contextvars.ContextVar('cnnlab_target_platform',
                                                                     default=None)


def traced_for(platform: str, fn: Callable) -> Callable:
  """`fn`, which when traced declares that it is compiled for `platform` (a jax.Device's
  .platform: 'cpu', 'gpu', 'tpu'): what it calls through `platform_dependent` takes that
  platform's branch alone. Wrap only a function compiled for that platform alone, and wrap the
  whole of it: a gradient taken outside `fn` traces its backward pass (a custom_vjp's backward
  function included) outside, with `lax.platform_dependent`."""
  platform = 'cpu' if platform == 'cpu' else 'default'

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    token = _target.set(platform)
    try:
      return fn(*args, **kwargs)
    finally:
      _target.reset(token)
  return wrapped


def platform_dependent(*args, cpu: Callable, default: Callable):
  """cpu(*args) when compiled for CPU, default(*args) elsewhere: chosen at trace time inside
  `traced_for`, else by `lax.platform_dependent` when the computation is lowered."""
  target = _target.get()
  if target is None:
    return lax.platform_dependent(*args, cpu=cpu, default=default)
  return (cpu if target == 'cpu' else default)(*args)


__all__ = ['traced_for', 'platform_dependent']
