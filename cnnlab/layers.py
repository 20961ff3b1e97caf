"""Building blocks of convolutional networks, as Flax Linen modules (NHWC, pure init/apply).

Every spatial layer resolves its padding with `cnnlab.geometry` from the static input shape, and
checks that its output is at least one cell wide, so an input too small for an architecture fails
with the name of the layer instead of an XLA shape error. Invalid arguments fail at construction.

Blocks take a `conv` argument (a `ConvBlock` partial carrying norm, dtype and batch-norm axis), as
Flax's ImageNet example does, so a model binds those settings once.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnlab import geometry

ModuleDef = Any
IntOrPair = Union[int, Sequence[int]]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array] | None] = {
    'relu': nn.relu,
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
  """The activation function called `name` (None for 'none'); callables pass through."""
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


def _spatial_input(module: nn.Module, x: jax.Array) -> None:
  if x.ndim != 4:
    raise ValueError(f'{layer_name(module)}: expected NHWC input of rank 4, got shape {x.shape}')


def _check_output(module: nn.Module, x: jax.Array, out: Sequence[int], what: str) -> None:
  if min(out) < 1:
    raise ValueError(
        f'{layer_name(module)}: input of spatial size {tuple(x.shape[1:3])} is too small for '
        f'{what} (output would be {tuple(out)}); use a larger input or less downsampling')


class ConvBlock(nn.Module):
  """Convolution, then optional normalisation, then activation.

  Attributes:
    features: output channels.
    kernel_size, strides, dilation: ints or (h, w) pairs.
    padding: 'VALID' | 'SAME' | 'FULL' | int | per-dim ints or (lo, hi) pairs (see cnnlab.geometry).
    groups: feature groups (`groups == in_channels == features` is a depthwise convolution).
    use_bias: default (None) adds a bias only when there is no normalisation to absorb it.
    norm: 'batch' | 'group' | 'layer' | 'none'.  act: a name in ACTIVATIONS or a callable.
    zero_init_norm: initialise the norm scale to 0 (the last norm of a residual branch, so every
      block starts as the identity; Goyal et al. 2017).
    dtype: compute dtype (None: inferred); parameters are kept in `param_dtype` (float32).
  Input (B, H, W, C_in) -> output (B, H', W', features).
  """
  features: int
  kernel_size: IntOrPair = 3
  strides: IntOrPair = 1
  padding: geometry.PaddingLike = 'SAME'
  dilation: IntOrPair = 1
  groups: int = 1
  use_bias: bool | None = None
  norm: str = 'batch'
  act: str | Callable = 'relu'
  num_groups: int = 32
  zero_init_norm: bool = False
  bn_momentum: float = 0.9  # running = momentum * running + (1 - momentum) * batch (PyTorch's 0.1)
  bn_epsilon: float = 1e-5
  bn_axis_name: str | None = None  # pmap axis for cross-replica batch statistics
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = he_normal_fan_out

  def __post_init__(self):
    geometry.check_positive('features', self.features)
    pair(self.kernel_size, 'kernel_size')
    pair(self.strides, 'strides')
    pair(self.dilation, 'dilation')
    geometry.check_positive('groups', self.groups)
    geometry.check_padding(self.padding)
    check_choice('norm', self.norm, NORMS)
    activation(self.act)
    if self.features % self.groups:
      raise ValueError(f'features ({self.features}) must be divisible by groups ({self.groups})')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _spatial_input(self, x)
    if x.shape[-1] % self.groups:
      raise ValueError(f'{layer_name(self)}: input channels ({x.shape[-1]}) must be divisible '
                       f'by groups ({self.groups})')
    kernel, strides, dilation = (pair(self.kernel_size, 'kernel_size'), pair(self.strides, 'strides'),
                                 pair(self.dilation, 'dilation'))
    pads = [geometry.resolve_padding(geometry.padding_for_dim(self.padding, i), kernel[i],
                                     strides[i], dilation[i], x.shape[1 + i]) for i in range(2)]
    out = [geometry.conv_output_size(x.shape[1 + i], kernel[i], strides[i], pads[i], dilation[i])
           for i in range(2)]
    _check_output(self, x, out, f'a {kernel[0]}x{kernel[1]} convolution with stride {strides}')
    use_bias = (self.norm == 'none') if self.use_bias is None else self.use_bias
    x = nn.Conv(self.features, kernel, strides, padding=pads, kernel_dilation=dilation,
                feature_group_count=self.groups, use_bias=use_bias, dtype=self.dtype,
                param_dtype=self.param_dtype, kernel_init=self.kernel_init, name='conv')(x)
    x = normalization(self.norm, train=train, zero_init=self.zero_init_norm,
                      momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                      axis_name=self.bn_axis_name, num_groups=self.num_groups,
                      features=self.features, dtype=self.dtype,
                      param_dtype=self.param_dtype)(x)
    fn = activation(self.act)
    return x if fn is None else fn(x)


def channel_sum(x: jax.Array) -> jax.Array:
  """Float32 sums over every axis but the last: (..., C) -> (C,).

  On CPU it is a matrix-vector product with a ones vector: XLA:CPU's reduction over the leading
  axes of a channels-last array is slow (9.7 ms for one 8x28x28x512 float32 array, against 0.3 ms
  for the product; bench/bench_channel_sum.py, bench/README.md "Batch norm and residual outputs").
  Other backends reduce well and keep `jnp.sum`, which lets XLA fuse the producer into it.
  """
  x = x.astype(jnp.float32)
  if jax.default_backend() == 'cpu':
    flat = x.reshape(-1, x.shape[-1])
    return lax.dot_general(jnp.ones(flat.shape[:1], jnp.float32), flat, (((0,), (0,)), ((), ())),
                           precision=lax.Precision.HIGHEST)
  return jnp.sum(x, axis=tuple(range(x.ndim - 1)))


def _bn_sums(axis_name: str | None, *xs: jax.Array) -> tuple[list[jax.Array], Any]:
  """channel_sum of each array, summed over the pmap axis; and the number of summed rows."""
  sums = [channel_sum(x) for x in xs]
  count = jnp.float32(xs[0].size // xs[0].shape[-1])
  if axis_name is not None:
    sums, count = lax.psum((sums, count), axis_name)
  return sums, count


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     axis_name: str | None, out_dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Batch norm over all axes but the last, with this batch's statistics: (y, mean, var).

  `var` is the biased variance E[x^2] - E[x]^2 (Flax's `use_fast_variance`), clipped at 0; the
  statistics are float32 and span the pmap axis `axis_name` when given (cross-replica batch norm).
  The gradient is written out (`_bn_bwd`) so that its three channel sums are `channel_sum`s too.
  """
  return _bn_fwd(x, scale, bias, epsilon, axis_name, out_dtype)[0]


def _bn_fwd(x, scale, bias, epsilon, axis_name, out_dtype):
  x32 = x.astype(jnp.float32)
  (s1, s2), count = _bn_sums(axis_name, x32, x32 * x32)
  mean = s1 / count
  var = jnp.maximum(0.0, s2 / count - mean * mean)
  inv = lax.rsqrt(var + epsilon)
  y = ((x32 - mean) * (inv * scale) + bias).astype(out_dtype)
  return (y, mean, var), (x, mean, inv, scale, count)


def _bn_bwd(epsilon, axis_name, out_dtype, residuals, cotangents):
  del epsilon, out_dtype
  x, mean, inv, scale, count = residuals
  gy, gmean, gvar = cotangents
  x32, g = x.astype(jnp.float32), gy.astype(jnp.float32)
  # This replica's sums give the parameters' gradients (the step averages them over replicas);
  # the input's gradient goes through the shared statistics, so it takes the sums over all.
  sum_g, sum_gx = channel_sum(g), channel_sum(g * x32)
  dbias = sum_g
  dscale = inv * (sum_gx - mean * sum_g)  # sum of g * x_hat
  if axis_name is not None:
    sum_g, sum_gx, gmean, gvar = lax.psum((sum_g, sum_gx, gmean, gvar), axis_name)
  sum_g_xhat = inv * (sum_gx - mean * sum_g)
  centred = x32 - mean
  dx = (scale * inv) * (g - sum_g / count - centred * inv * (sum_g_xhat / count))
  dx = dx + gmean / count + gvar * (2.0 / count) * centred
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


class BatchNorm(nn.Module):
  """Batch normalisation over the channel (last) axis; Flax's `nn.BatchNorm`, faster on CPU.

  Its variables, defaults and arithmetic are Flax's (params 'scale', 'bias'; batch_stats 'mean',
  'var'; momentum-weighted running averages; biased variance E[x^2] - E[x]^2, statistics in
  float32), so checkpoints and model surgery treat the two alike. The training-mode statistics and
  the gradient's sums go through `channel_sum` (`batch_norm_train`).
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
    if self.use_running_average:
      mul = lax.rsqrt(ra_var.value + self.epsilon) * scale
      return ((x.astype(jnp.float32) - ra_mean.value) * mul + bias).astype(out_dtype)
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


class Pool(nn.Module):
  """Max or average pooling over H and W.

  Attributes:
    kind: 'max' | 'avg'.  window, strides (default: window): ints or pairs.
    padding: as for ConvBlock. Max pooling pads with -inf.
    count_include_pad: average pooling divides by the whole window including explicit padding
      (PyTorch's default) or only by the input cells it covers.
    ceil_mode: PyTorch's ceil_mode, keeping a last partial window (never counted as padding).
  Input (B, H, W, C) -> output (B, H', W', C).
  """
  kind: str = 'max'
  window: IntOrPair = 2
  strides: IntOrPair | None = None
  padding: geometry.PaddingLike = 0
  count_include_pad: bool = True
  ceil_mode: bool = False

  def __post_init__(self):
    check_choice('pool', self.kind, ('max', 'avg'))
    pair(self.window, 'pool window')
    if self.strides is not None:
      pair(self.strides, 'pool strides')
    geometry.check_padding(self.padding, name='pool padding')
    super().__post_init__()

  def geometry(self, spatial: Sequence[int]):
    """((window, stride, (lo, hi), extra_hi) for H, W): the resolved window arithmetic."""
    window = pair(self.window, 'pool window')
    strides = window if self.strides is None else pair(self.strides, 'pool strides')
    dims = []
    for i in range(2):
      lo, hi = geometry.resolve_padding(geometry.padding_for_dim(self.padding, i), window[i],
                                        strides[i], 1, spatial[i])
      extra = geometry.ceil_mode_extra(spatial[i], window[i], strides[i], lo, hi) if self.ceil_mode else 0
      dims.append((window[i], strides[i], (lo, hi), extra))
    return dims

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _spatial_input(self, x)
    dims = self.geometry(x.shape[1:3])
    out = [(x.shape[1 + i] + lo + hi + extra - w) // s + 1
           for i, (w, s, (lo, hi), extra) in enumerate(dims)]
    _check_output(self, x, out, f'{self.kind} pooling with window {pair(self.window, "window")}')
    window = (1,) + tuple(d[0] for d in dims) + (1,)
    strides = (1,) + tuple(d[1] for d in dims) + (1,)
    pads = ((0, 0),) + tuple((lo, hi + extra) for _, _, (lo, hi), extra in dims) + ((0, 0),)
    if self.kind == 'max':
      return _max_pool(x, window[1:3], strides[1:3], pads[1:3], tuple(out))
    summed = lax.reduce_window(x, 0.0, lax.add, window, strides, pads)
    # Divisor per output cell: the cells each window covers that count (static, built in numpy).
    spatial = np.ones(x.shape[1:3], np.float32)
    if self.count_include_pad:  # explicit padding counts, ceil-mode overhang does not
      spatial = np.pad(spatial, [(lo, hi) for _, _, (lo, hi), _ in dims], constant_values=1.0)
      count_pads = [(0, extra) for *_, extra in dims]
    else:
      count_pads = [(lo, hi + extra) for _, _, (lo, hi), extra in dims]
    counts = lax.reduce_window(jnp.asarray(spatial), 0.0, lax.add, window[1:3], strides[1:3],
                               count_pads)
    return summed / counts[None, :, :, None].astype(summed.dtype)


def _window_views(padded: jax.Array, window, strides, out) -> list[tuple[int, int, jax.Array]]:
  """(i, j, view) for each cell (i, j) of the window, row-major: the strided (B, out..., C) slice."""
  views = []
  for i in range(window[0]):
    for j in range(window[1]):
      limit = (padded.shape[0], i + strides[0] * (out[0] - 1) + 1,
               j + strides[1] * (out[1] - 1) + 1, padded.shape[3])
      views.append((i, j, lax.slice(padded, (0, i, j, 0), limit, (1, *strides, 1))))
  return views


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x: jax.Array, window, strides, pads, out) -> jax.Array:
  """Max pooling as the elementwise maximum of the window's strided views of the -inf-padded input.

  The same values as `lax.reduce_window(x, -inf, max, ...)`, but a far cheaper gradient on CPU:
  XLA:CPU expands reduce_window's (select-and-scatter) into index iotas, a variadic reduce-window
  and a scatter, about 23 ms for a 128x14x14x64 map where this takes 0.5 ms (`bench/README.md`).
  The gradient is written out (`_max_pool_bwd`): each output's gradient goes to the first cell of
  its window, in row-major order, that holds the maximum, as in PyTorch. (Autodiff of the maximum
  chain would share it between tied cells, through selects and divisions that cost 0.4 s a step in
  GoogLeNet's bfloat16 pools.)
  """
  return _max_pool_fwd(x, window, strides, pads, out)[0]


def _max_pool_fwd(x, window, strides, pads, out):
  padded = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
  result = None
  for _, _, view in _window_views(padded, window, strides, out):
    result = view if result is None else jnp.maximum(result, view)
  return result, (padded, result)


def _max_pool_bwd(window, strides, pads, out, residuals, g):
  padded, result = residuals
  taken = jnp.zeros(result.shape, bool)
  grad = jnp.zeros(padded.shape, g.dtype)
  zero = jnp.zeros((), g.dtype)
  for i, j, view in _window_views(padded, window, strides, out):
    first = (view == result) & ~taken
    taken = taken | first
    # Back to the view's cells of the padded input: the transpose of the strided slice.
    config = [(0, 0, 0),
              (i, padded.shape[1] - i - strides[0] * (out[0] - 1) - 1, strides[0] - 1),
              (j, padded.shape[2] - j - strides[1] * (out[1] - 1) - 1, strides[1] - 1),
              (0, 0, 0)]
    grad = grad + lax.pad(jnp.where(first, g, zero), zero, config)
  (lo_h, _), (lo_w, _) = pads
  h, w = padded.shape[1] - sum(pads[0]), padded.shape[2] - sum(pads[1])
  return (grad[:, lo_h:lo_h + h, lo_w:lo_w + w, :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def make_pool(kind: str, window: IntOrPair = 2, strides: IntOrPair | None = None,
              padding: geometry.PaddingLike = 0, name: str | None = None, **kwargs) -> Pool | None:
  """The `pool` choice every stack offers: 'max' | 'avg' | 'none' (None: no pooling layer)."""
  check_choice('pool', kind, POOLS)
  if kind == 'none':
    return None
  return Pool(kind, window, strides, padding, name=name, **kwargs)


class GlobalPool(nn.Module):
  """Global average or max pooling: (B, H, W, C) -> (B, C)."""
  kind: str = 'avg'

  def __post_init__(self):
    check_choice('global pool', self.kind, ('avg', 'max'))
    super().__post_init__()

  def __call__(self, x: jax.Array) -> jax.Array:
    _spatial_input(self, x)
    return jnp.mean(x, axis=(1, 2)) if self.kind == 'avg' else jnp.max(x, axis=(1, 2))


def _adaptive_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(out, in) averaging matrix of PyTorch's adaptive pooling windows along one dim."""
  m = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    start, end = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


class AdaptiveAvgPool(nn.Module):
  """PyTorch's AdaptiveAvgPool2d: (B, H, W, C) -> (B, *output_size, C).

  A rectangle's mean is the product of two 1-D means, so this is two small static matrices.
  """
  output_size: IntOrPair = 1

  def __call__(self, x: jax.Array) -> jax.Array:
    _spatial_input(self, x)
    oh, ow = pair(self.output_size, 'output_size')
    mh = jnp.asarray(_adaptive_matrix(x.shape[1], oh), x.dtype)
    mw = jnp.asarray(_adaptive_matrix(x.shape[2], ow), x.dtype)
    return jnp.einsum('oh,bhwc,pw->bopc', mh, x, mw)


class BasicBlock(nn.Module):
  """ResNet's two 3x3 convolutions with an identity shortcut: out = act(F(x) + shortcut(x)).

  shortcut: 'projection' (1x1 conv + norm when the shape changes; ResNet option B) or 'pad'
  (subsample and zero-pad the channels, parameter-free; option A of the CIFAR ResNets).
  Input (B, H, W, C) -> (B, H/strides, W/strides, features).
  """
  features: int
  strides: int = 1
  conv: ModuleDef = ConvBlock
  zero_init_last: bool = False
  shortcut: str = 'projection'
  act: str = 'relu'
  expansion = 1

  def __post_init__(self):
    geometry.check_positive('features', self.features)
    geometry.check_positive('strides', self.strides)
    check_choice('shortcut', self.shortcut, ('projection', 'pad'))
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = self.conv(self.features, 3, self.strides, padding=1, name='conv1')(x, train)
    y = self.conv(self.features, 3, 1, padding=1, act='none', zero_init_norm=self.zero_init_last,
                  name='conv2')(y, train)
    return residual_activation(y, _shortcut(self, x, train), self.act)


class Bottleneck(nn.Module):
  """ResNet v1.5 bottleneck: 1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4.

  `groups` and `base_width` give ResNeXt / wide variants (width = features * base_width/64 * groups).
  Input (B, H, W, C) -> (B, H/strides, W/strides, 4 * features).
  """
  features: int
  strides: int = 1
  conv: ModuleDef = ConvBlock
  zero_init_last: bool = False
  groups: int = 1
  base_width: int = 64
  shortcut: str = 'projection'
  act: str = 'relu'
  expansion = 4

  def __post_init__(self):
    geometry.check_positive('features', self.features)
    geometry.check_positive('strides', self.strides)
    check_choice('shortcut', self.shortcut, ('projection', 'pad'))
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    width = int(self.features * (self.base_width / 64.0)) * self.groups
    y = self.conv(width, 1, 1, padding=0, name='conv1')(x, train)
    y = self.conv(width, 3, self.strides, padding=1, groups=self.groups, name='conv2')(y, train)
    y = self.conv(self.features * self.expansion, 1, 1, padding=0, act='none',
                  zero_init_norm=self.zero_init_last, name='conv3')(y, train)
    return residual_activation(y, _shortcut(self, x, train), self.act)


def residual_activation(y: jax.Array, shortcut: jax.Array, act: str | Callable) -> jax.Array:
  """act(y + shortcut): a residual block's output.

  ReLU is computed as where(y > -shortcut, y + shortcut, 0): the same values, and the same
  gradient (0 where the sum is 0, as ReLU's). Written so, the last operation reads two arrays, and
  XLA:CPU stores the block's output once instead of recomputing every earlier block's
  normalisation and sum inside each consumer, the kernel gradients' transposes included
  (bench/README.md, "Batch norm and residual outputs").
  """
  if act == 'relu' or act is nn.relu:
    return jnp.where(y > -shortcut, y + shortcut, 0.0)
  fn = activation(act)
  return y + shortcut if fn is None else fn(y + shortcut)


def _shortcut(block: BasicBlock | Bottleneck, x: jax.Array, train: bool) -> jax.Array:
  out_features = block.features * block.expansion
  if block.strides == 1 and x.shape[-1] == out_features:
    return x
  if block.shortcut == 'projection':
    return block.conv(out_features, 1, block.strides, padding=0, act='none',
                      name='shortcut')(x, train)
  x = x[:, ::block.strides, ::block.strides, :]
  extra = out_features - x.shape[-1]
  if extra < 0:
    raise ValueError(f'{layer_name(block)}: a "pad" shortcut cannot reduce channels '
                     f'({x.shape[-1]} -> {out_features})')
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class InceptionBlock(nn.Module):
  """GoogLeNet's Inception module: four parallel branches concatenated on channels.

    branch1: 1x1                         -> ch1x1
    branch2: 1x1 (ch3x3red) -> 3x3        -> ch3x3
    branch3: 1x1 (ch5x5red) -> KxK        -> ch5x5   (K = branch3_kernel: 5 in the paper; 3 in
                                                      torchvision's googlenet, whose weights and
                                                      parameter counts we match)
    branch4: 3x3 max-pool (stride 1) -> 1x1 projection -> pool_proj
  Input (B, H, W, C) -> (B, H, W, ch1x1 + ch3x3 + ch5x5 + pool_proj).
  """
  ch1x1: int
  ch3x3red: int
  ch3x3: int
  ch5x5red: int
  ch5x5: int
  pool_proj: int
  branch3_kernel: int = 5
  conv: ModuleDef = ConvBlock

  def __post_init__(self):
    for name in ('ch1x1', 'ch3x3red', 'ch3x3', 'ch5x5red', 'ch5x5', 'pool_proj', 'branch3_kernel'):
      geometry.check_positive(name, getattr(self, name))
    if self.branch3_kernel % 2 == 0:
      raise ValueError(f'branch3_kernel must be odd to keep the spatial size, got {self.branch3_kernel}')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    b1 = self.conv(self.ch1x1, 1, padding=0, name='branch1')(x, train)
    b2 = self.conv(self.ch3x3red, 1, padding=0, name='branch2_reduce')(x, train)
    b2 = self.conv(self.ch3x3, 3, padding=1, name='branch2')(b2, train)
    b3 = self.conv(self.ch5x5red, 1, padding=0, name='branch3_reduce')(x, train)
    b3 = self.conv(self.ch5x5, self.branch3_kernel, padding=self.branch3_kernel // 2,
                   name='branch3')(b3, train)
    b4 = Pool('max', 3, 1, padding=1, ceil_mode=True, name='branch4_pool')(x)
    b4 = self.conv(self.pool_proj, 1, padding=0, name='branch4_proj')(b4, train)
    return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class AuxHead(nn.Module):
  """GoogLeNet's auxiliary classifier (torchvision's InceptionAux).

  4x4 adaptive average pool -> 1x1 conv (128) -> flatten -> dense 1024 -> ReLU -> dropout 0.7 ->
  dense num_classes. Input (B, H, W, C) -> logits (B, num_classes).
  """
  num_classes: int
  conv: ModuleDef = ConvBlock
  pool_size: int = 4
  proj_features: int = 128
  hidden: int = 1024
  dropout: float = 0.7
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = AdaptiveAvgPool(self.pool_size, name='pool')(x)
    x = self.conv(self.proj_features, 1, padding=0, name='conv')(x, train)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name='fc1')(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='fc2')(x)


class UpBlock(nn.Module):
  """Learnable upsampling: transposed convolution, then optional norm and activation.

  Output size follows PyTorch's ConvTranspose2d:
  (n - 1) * strides - 2 * padding + dilation * (kernel - 1) + output_padding + 1
  (see geometry.conv_transpose_output_size). Input (B, H, W, C) -> (B, H', W', features).
  """
  features: int
  kernel_size: int = 2
  strides: int = 2
  padding: int = 0
  output_padding: int = 0
  dilation: int = 1
  norm: str = 'batch'
  act: str | Callable = 'relu'
  use_bias: bool | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ('features', 'kernel_size', 'strides', 'dilation'):
      geometry.check_positive(name, getattr(self, name))
    if self.padding < 0 or self.output_padding < 0:
      raise ValueError(f'padding and output_padding must be >= 0, got {self.padding}, {self.output_padding}')
    if self.output_padding >= max(self.strides, self.dilation):
      raise ValueError(f'output_padding ({self.output_padding}) must be smaller than strides or dilation')
    check_choice('norm', self.norm, NORMS)
    activation(self.act)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _spatial_input(self, x)
    k, s, d = self.kernel_size, self.strides, self.dilation
    out = [geometry.conv_transpose_output_size(n, k, s, self.padding, d, self.output_padding)
           for n in x.shape[1:3]]
    _check_output(self, x, out, f'a {k}x{k} transposed convolution with padding {self.padding}')
    # A transposed convolution is a convolution over the stride-dilated input padded by
    # d(k-1) - p on each side (plus output_padding at the end).
    lo = d * (k - 1) - self.padding
    pads = [(lo, lo + self.output_padding)] * 2
    use_bias = (self.norm == 'none') if self.use_bias is None else self.use_bias
    x = nn.ConvTranspose(self.features, (k, k), (s, s), padding=pads, kernel_dilation=(d, d),
                         use_bias=use_bias, transpose_kernel=True, dtype=self.dtype,
                         param_dtype=self.param_dtype, name='conv')(x)
    x = normalization(self.norm, train=train, features=self.features, dtype=self.dtype,
                      param_dtype=self.param_dtype)(x)
    fn = activation(self.act)
    return x if fn is None else fn(x)


def conv_block(**defaults) -> ModuleDef:
  """A ConvBlock partial with model-wide defaults (norm, dtype, bn_axis_name, ...)."""
  return functools.partial(ConvBlock, **defaults)


class MLPHead(nn.Module):
  """Classifier of AlexNet/VGG: flatten -> [dense -> act] per hidden width -> dense num_classes.

  Dropout of `dropout` goes before each hidden dense layer (`dropout_first`, AlexNet) or after
  each activation (VGG). Input (B, ...) -> logits (B, num_classes).
  """
  num_classes: int
  hidden: Sequence[int] = (4096, 4096)
  dropout: float = 0.5
  dropout_first: bool = False
  act: str = 'relu'
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    drop = nn.Dropout(self.dropout, deterministic=not train)
    for i, features in enumerate(self.hidden, start=1):
      x = drop(x) if self.dropout_first else x
      x = activation(self.act)(nn.Dense(features, dtype=self.dtype, name=f'fc{i}')(x))
      x = x if self.dropout_first else drop(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='fc_out')(x)
