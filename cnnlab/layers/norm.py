"""Normalisation: batch norm (with its gradient written out for CPU), group and layer norm.

`BatchNorm` is Flax's `nn.BatchNorm` (same variables, defaults and arithmetic). On CPU its
statistics and gradient sums are products with a ones vector (`channel_sum`) and its gradient is
written out (`batch_norm_train`), which XLA:CPU runs far faster than its own reductions; on other
platforms the same arithmetic goes through `jnp.sum` and autodiff. The choice is made for the
platform the computation is compiled for (`cnnlab.platforms.platform_dependent`), not for the
process's default backend.

Frozen batch norm (`frozen_batch_norm(paths)`, what `optim.freeze` uses): the BatchNorm layers at
the given module paths normalise with their running statistics in training too and leave them
unchanged, as a frozen backbone's layers should; no model code takes part.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnnlab.layers.common import NORMS, check_choice
from cnnlab.platforms import platform_dependent

# Rows summed by each partial sum of `channel_sum`'s product (at most; a power of two dividing the
# row count). One product over all rows accumulates each channel along one long chain, and its
# float32 rounding error grew with the row count: 1.4e-5 relative for 128x32x32x64 against 2e-7
# with 128 partial sums, which are also faster (3.9 ms against 0.9; bench/bench_channel_sum.py).
CHANNEL_SUM_SPLIT = 128


# Module paths ('stage1_conv1/norm') of the BatchNorm layers frozen in the computation being traced.
_frozen: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar('cnnlab_frozen_batch_norm',
                                                                        default=frozenset())


@contextlib.contextmanager
def frozen_batch_norm(paths: Iterable[str]) -> Iterator[None]:
  """Within the block, the BatchNorm layers at the '/'-joined module `paths` ('stage1_conv1/norm',
  as in the model's variables) behave as in inference even when called with training on: they
  normalise with their running statistics and do not update them (their 'batch_stats' come back
  unchanged from `apply(..., mutable=['batch_stats'])`).

  Read when a computation is traced, not when it runs: enter it inside the function that is
  jitted (the train step does, around `model.apply`), so the compiled step carries it.
  """
  token = _frozen.set(frozenset(paths))
  try:
    yield
  finally:
    _frozen.reset(token)


def _stats_dtype(x: jax.Array):
  """Batch statistics' dtype: float32, or float64 for float64 inputs (a reference computation)."""
  return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def channel_sum(x: jax.Array) -> jax.Array:
  """Sums over every axis but the last, in float32 or wider: (..., C) -> (C,).

  On CPU it is a matrix-vector product with a ones vector (`_channel_sum_product`): XLA:CPU's
  reduction over the leading axes of a channels-last array is slow (9.7 ms for one 8x28x28x512
  float32 array, against 0.3 ms for the product; bench/bench_channel_sum.py). Elsewhere it is
  `jnp.sum`, which reduces well there and lets XLA fuse the producer into it.
  """
  x = x.astype(_stats_dtype(x))
  return platform_dependent(x, cpu=_channel_sum_product, default=_channel_sum_reduce)


def _channel_sum_reduce(x: jax.Array) -> jax.Array:
  return jnp.sum(x, axis=tuple(range(x.ndim - 1)))


def _channel_sum_product(x: jax.Array) -> jax.Array:
  """channel_sum as a product with a ones vector. The rows are viewed as (rows / k, k * C) and the
  product gives k partial sums per channel, added last (k = CHANNEL_SUM_SPLIT or the largest
  power of two below it that divides the rows): each accumulation stays short and accurate."""
  channels = x.shape[-1]
  rows = x.size // channels
  split = math.gcd(rows, CHANNEL_SUM_SPLIT)
  flat = x.reshape(rows // split, split * channels)
  partial = lax.dot_general(jnp.ones(flat.shape[:1], x.dtype), flat, (((0,), (0,)), ((), ())),
                            precision=lax.Precision.HIGHEST)
  return jnp.sum(partial.reshape(split, channels), axis=0)


def _bn_sums(axis_name: str | None, *xs: jax.Array) -> tuple[list[jax.Array], Any]:
  """channel_sum of each array, summed over the pmap axis; and the number of summed rows."""
  sums = [channel_sum(x) for x in xs]
  count = jnp.asarray(xs[0].size // xs[0].shape[-1], sums[0].dtype)
  if axis_name is not None:
    sums, count = lax.psum((sums, count), axis_name)
  return sums, count


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     axis_name: str | None, out_dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Batch norm over all axes but the last, with this batch's statistics: (y, mean, var).

  `var` is the biased variance E[x^2] - E[x]^2 (Flax's `use_fast_variance`), clipped at 0; the
  statistics are float32 (float64 for a float64 input) and span the pmap axis `axis_name` when
  given (cross-replica batch norm). On CPU the gradient is written out (`_bn_bwd`) so that its sums
  are `channel_sum` products too; elsewhere it is autodiff's.
  """
  return platform_dependent(
      x, scale, bias,
      cpu=lambda *xsb: _batch_norm_vjp(*xsb, epsilon, axis_name, out_dtype),
      default=lambda *xsb: _bn_fwd(*xsb, epsilon, axis_name, out_dtype)[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _batch_norm_vjp(x, scale, bias, epsilon, axis_name, out_dtype):
  return _bn_fwd(x, scale, bias, epsilon, axis_name, out_dtype)[0]


def _bn_fwd(x, scale, bias, epsilon, axis_name, out_dtype):
  xs = x.astype(_stats_dtype(x))
  (s1, s2), count = _bn_sums(axis_name, xs, xs * xs)
  mean = s1 / count
  var = jnp.maximum(0.0, s2 / count - mean * mean)
  inv = lax.rsqrt(var + epsilon)
  y = ((xs - mean) * (inv * scale) + bias).astype(out_dtype)
  return (y, mean, var), (x, mean, inv, scale, count)


def _bn_bwd(epsilon, axis_name, out_dtype, residuals, cotangents):
  del epsilon, out_dtype
  x, mean, inv, scale, count = residuals
  gy, gmean, gvar = cotangents
  centred = x.astype(mean.dtype) - mean
  g = gy.astype(mean.dtype)
  # This replica's sums give the parameters' gradients (the step averages them over replicas);
  # the input's gradient goes through the shared statistics, so it takes the sums over all.
  # Sum g * (x - mean), not g * x minus mean * sum(g): the latter cancels when the mean is large.
  sum_g, sum_gc = channel_sum(g), channel_sum(g * centred)
  dbias, dscale = sum_g, inv * sum_gc  # dscale: the sum of g * x_hat
  if axis_name is not None:
    sum_g, sum_gc, gmean, gvar = lax.psum((sum_g, sum_gc, gmean, gvar), axis_name)
  dx = (scale * inv) * (g - sum_g / count - centred * (inv * inv) * (sum_gc / count))
  dx = dx + gmean / count + gvar * (2.0 / count) * centred
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


_batch_norm_vjp.defvjp(_bn_fwd, _bn_bwd)


class BatchNorm(nn.Module):
  """Batch normalisation over the channel (last) axis; Flax's `nn.BatchNorm`, faster on CPU.

  Its variables, defaults and arithmetic are Flax's (params 'scale', 'bias'; batch_stats 'mean',
  'var'; momentum-weighted running averages; biased variance E[x^2] - E[x]^2, statistics in
  float32), so checkpoints and model surgery treat the two alike. The training-mode statistics and
  the gradient's sums go through `channel_sum` (`batch_norm_train`). Inside `frozen_batch_norm`
  naming its path, it uses its running statistics whatever `use_running_average` says.
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  axis_name: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', self.scale_init, (features,), self.param_dtype)
    bias = self.param('bias', self.bias_init, (features,), self.param_dtype)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    out_dtype = self.dtype or jnp.promote_types(x.dtype, self.param_dtype)
    frozen = _frozen.get()
    if self.use_running_average or (frozen and '/'.join(self.path) in frozen):
      mul = lax.rsqrt(ra_var.value + self.epsilon) * scale
      return ((x.astype(_stats_dtype(x)) - ra_mean.value) * mul + bias).astype(out_dtype)
    # Initialisation runs outside pmap, so the axis does not exist then (as in Flax).
    axis_name = None if self.is_initializing() else self.axis_name
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, axis_name, out_dtype)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
    return y


def normalization(kind: str, *, train: bool, features: int, zero_init: bool = False,
                  momentum: float = 0.9, epsilon: float = 1e-5, axis_name: str | None = None,
                  num_groups: int = 32, dtype: Any = None, param_dtype: Any = jnp.float32,
                  name: str = 'norm') -> Callable[[jax.Array], jax.Array]:
  """A normalisation module over the channel axis (identity for 'none'); called inside compact."""
  scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
  if kind == 'batch':
    norm = BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                     axis_name=axis_name, dtype=dtype, param_dtype=param_dtype,
                     scale_init=scale_init, name=name)
  elif kind == 'group':
    # The largest group count <= num_groups that divides the channels (32 is GN's default).
    groups = max(g for g in range(1, min(num_groups, features) + 1) if features % g == 0)
    norm = nn.GroupNorm(num_groups=groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                        scale_init=scale_init, name=name)
  elif kind == 'layer':
    norm = nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                        scale_init=scale_init, name=name)
  else:
    check_choice('norm', kind, NORMS)
    return lambda x: x
  def normalize(x):
    # Flax keeps the statistics in float32 whatever the compute dtype and promotes a bfloat16 or
    # float16 input to meet them, which the strict promotion our tests use refuses.
    with jax.numpy_dtype_promotion('standard'):
      return norm(x)
  return normalize
