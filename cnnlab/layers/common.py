"""What every layer shares: argument checks, shape checks, activations, the choices, the initialiser.

Every spatial layer resolves its padding with `cnnlab.geometry` from the static input shape and
checks that its output is at least one cell wide (`check_output`), so an input too small for an
architecture fails with the name of the layer instead of an XLA shape error. Invalid arguments
fail at construction.

Every ReLU in cnnlab.layers is `relu` (`activation('relu')`, the residual sum, the heads), so
`relu_backward('guided' | 'deconvnet')` reaches all of them: attribution methods
(`cnnlab.explain`) change ReLU's backward pass by setting it around a trace, with no per-model code.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab import geometry

ModuleDef = Any
IntOrPair = Union[int, Sequence[int]]

# The backward pass ReLU gets when traced: 'default' is autodiff's (the gradient masked where the
# input is <= 0); 'guided' also drops negative gradients (guided backpropagation, Springenberg et
# al. 2014); 'deconvnet' passes relu(gradient) whatever the input was (Zeiler & Fergus 2013).
RELU_BACKWARD = ('default', 'guided', 'deconvnet')
_relu_backward: contextvars.ContextVar[str] = contextvars.ContextVar('cnnlab_relu_backward',
                                                                     default='default')


@contextlib.contextmanager
def relu_backward(mode: str) -> Iterator[None]:
  """Within the block, every `relu` traced gets the backward pass `mode` (one of RELU_BACKWARD).

  Read when a computation is traced, not when it runs: enter it inside the function that is
  differentiated (and jitted), around `model.apply`. A function jitted and traced outside the
  block keeps the ordinary gradient.
  """
  check_choice('relu backward', mode, RELU_BACKWARD)
  token = _relu_backward.set(mode)
  try:
    yield
  finally:
    _relu_backward.reset(token)


def relu_backward_mode() -> str:
  """The mode `relu` is traced with here (see `relu_backward`)."""
  return _relu_backward.get()


def relu(x: jax.Array) -> jax.Array:
  """max(x, 0): every ReLU of cnnlab.layers. Outside `relu_backward` it is `jax.nn.relu` itself
  (the same program as before, for training); inside, a ReLU with the chosen backward pass."""
  mode = _relu_backward.get()
  if mode == 'guided':
    return _guided_relu(x)
  if mode == 'deconvnet':
    return _deconvnet_relu(x)
  return jax.nn.relu(x)


def _relu_fwd(x):
  return jax.nn.relu(x), x


@jax.custom_vjp
def _guided_relu(x: jax.Array) -> jax.Array:
  return jax.nn.relu(x)


def _guided_bwd(x, g):
  # Only where the input was positive (the forward mask) and the gradient is positive.
  return (jnp.where(x > 0, jnp.maximum(g, 0), jnp.zeros((), g.dtype)),)


@jax.custom_vjp
def _deconvnet_relu(x: jax.Array) -> jax.Array:
  return jax.nn.relu(x)


def _deconvnet_bwd(x, g):
  del x  # the deconvnet ignores the forward mask: it rectifies the signal going down
  return (jnp.maximum(g, 0),)


_guided_relu.defvjp(_relu_fwd, _guided_bwd)
_deconvnet_relu.defvjp(_relu_fwd, _deconvnet_bwd)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array] | None] = {
    'relu': relu,
    'relu6': nn.relu6,
    'gelu': nn.gelu,
    'silu': nn.silu,
    'swish': nn.silu,
    'elu': nn.elu,
    'leaky_relu': nn.leaky_relu,
    'tanh': jnp.tanh,
    'sigmoid': nn.sigmoid,
    'none': None,
}
NORMS = ('batch', 'group', 'layer', 'none')
POOLS = ('max', 'avg', 'none')

# He (Kaiming) normal over fan-out, as torchvision initialises ResNet/VGG convolutions.
he_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def pair(value: IntOrPair, name: str) -> tuple[int, int]:
  """(h, w) from an int or a 2-sequence of positive ints; ValueError naming `name` otherwise."""
  values = (value, value) if isinstance(value, int) else tuple(value)
  if len(values) != 2:
    raise ValueError(f'{name} must be an int or a pair of ints, got {value!r}')
  for v in values:
    geometry.check_positive(name, v)
  return values  # type: ignore[return-value]


def activation(name: str | Callable) -> Callable[[jax.Array], jax.Array] | None:
  """The activation function called `name` (None for 'none'); callables pass through, except
  `jax.nn.relu` (= `flax.linen.relu`), which becomes `relu` so that `relu_backward` reaches it."""
  if name is jax.nn.relu:
    return relu
  if callable(name):
    return name
  if name not in ACTIVATIONS:
    raise ValueError(f'act must be one of {sorted(ACTIVATIONS)} or a callable, got {name!r}')
  return ACTIVATIONS[name]


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
  if value not in choices:
    raise ValueError(f'{name} must be one of {tuple(choices)}, got {value!r}')
  return value


def layer_name(module: nn.Module) -> str:
  """'stage2_block1/conv2': the module's path, for error messages."""
  return '/'.join(module.path) or type(module).__name__


def spatial_input(module: nn.Module, x: jax.Array) -> None:
  if x.ndim != 4:
    raise ValueError(f'{layer_name(module)}: expected NHWC input of rank 4, got shape {x.shape}')


def check_output(module: nn.Module, x: jax.Array, out: Sequence[int], what: str) -> None:
  if min(out) < 1:
    raise ValueError(
        f'{layer_name(module)}: input of spatial size {tuple(x.shape[1:3])} is too small for '
        f'{what} (output would be {tuple(out)}); use a larger input or less downsampling')
