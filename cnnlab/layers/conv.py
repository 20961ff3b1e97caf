"""ConvBlock: convolution, then optional normalisation, then activation.

On CPU a convolution whose input or output is spatially smaller than its kernel (a 3x3
convolution of a 2x2 or 1x1 map, a 3x3/2 one from 4x4 to 2x2: ResNet-18's last stage at a 16x16
input, GoogLeNet's last inception blocks at 32x32) is a product of the input's patches with the
kernel (`conv_general_dilated`, `_patches_conv`): XLA would swap the operands of the convolution
or of its gradient and run it as a naive loop, many times slower. Other convolutions, and other
platforms, run `lax.conv_general_dilated`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnnlab import geometry
from cnnlab.layers.common import (IntOrPair, ModuleDef, NORMS, activation, check_choice,
                                  check_output, he_normal_fan_out, layer_name, pair, spatial_input)
from cnnlab.layers.norm import normalization
from cnnlab.platforms import platform_dependent

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
    spatial_input(self, x)
    if x.shape[-1] % self.groups:
      raise ValueError(f'{layer_name(self)}: input channels ({x.shape[-1]}) must be divisible '
                       f'by groups ({self.groups})')
    kernel, strides, dilation = (pair(self.kernel_size, 'kernel_size'), pair(self.strides, 'strides'),
                                 pair(self.dilation, 'dilation'))
    pads = [geometry.resolve_padding(geometry.padding_for_dim(self.padding, i), kernel[i],
                                     strides[i], dilation[i], x.shape[1 + i]) for i in range(2)]
    out = [geometry.conv_output_size(x.shape[1 + i], kernel[i], strides[i], pads[i], dilation[i])
           for i in range(2)]
    check_output(self, x, out, f'a {kernel[0]}x{kernel[1]} convolution with stride {strides}')
    use_bias = (self.norm == 'none') if self.use_bias is None else self.use_bias
    x = nn.Conv(self.features, kernel, strides, padding=pads, kernel_dilation=dilation,
                feature_group_count=self.groups, use_bias=use_bias, dtype=self.dtype,
                param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                conv_general_dilated=conv_general_dilated, name='conv')(x)
    x = normalization(self.norm, train=train, zero_init=self.zero_init_norm,
                      momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                      axis_name=self.bn_axis_name, num_groups=self.num_groups,
                      features=self.features, dtype=self.dtype,
                      param_dtype=self.param_dtype)(x)
    fn = activation(self.act)
    return x if fn is None else fn(x)


def conv_block(**defaults) -> ModuleDef:
  """A ConvBlock partial with model-wide defaults (norm, dtype, bn_axis_name, ...)."""
  return functools.partial(ConvBlock, **defaults)


# The layout ConvBlock (Flax's nn.Conv) convolves in, the only one `conv_general_dilated` rewrites.
_LAYOUT = ('NHWC', 'HWIO', 'NHWC')


def xla_swaps_operands(input_size, kernel_size, strides, pads, dilation,
                       base_dilation=None) -> bool:
  """Whether XLA's ConvOperandSwapper (xla/hlo/transforms/simplifiers/conv_operand_swapper.cc)
  swaps an ungrouped convolution's input and kernel, from its spatial geometry: per spatial dim
  the input and kernel sizes, window stride, (lo, hi) padding, kernel (window) dilation and input
  (base) dilation (default 1).

  A dim where the kernel covers the whole input (same size, no padding, strides and dilations 1)
  is a contraction, and one with input dilation the kernel size and stride one less a group dim
  (XLA's rewrite of grouped convolutions); the swapper leaves both out. Over the other dims it
  compares the product of the kernel sizes with the product of the input sizes (a 1x1 input
  padded by kernel - 1 on both sides counts as the kernel's size) and swaps when the kernel's is
  larger. XLA:CPU does not hand the swapped convolution (the kernel becomes the input, dim labels
  like 01fb_o01i->f01b) to Eigen but emits a naive loop: a 3x3 'SAME' convolution of a 8x2x2x512
  input took 97 ms, of 8x4x4x512 10 ms. tests/test_layers.py checks this against the compiled
  HLO, so that an XLA upgrade that moves the rule shows.
  """
  kernel_product = swapped_product = 1
  for i, (n, k, s, (lo, hi), d) in enumerate(zip(input_size, kernel_size, strides, pads, dilation)):
    b = 1 if base_dilation is None else base_dilation[i]
    if lo == hi == 0 and d == 1 and ((b == k and s == k - 1) or (n == k and b == 1 and s == 1)):
      continue
    kernel_product *= k
    swapped_product *= k if (n == 1 and s == 1 and d == 1 and lo == hi == k - 1) else n
  return kernel_product > swapped_product


def gradient_convolutions(size, kernel, strides, pads, dilation, out) -> dict[str, tuple]:
  """`xla_swaps_operands`' arguments for a convolution without input dilation ('forward') and for
  the two convolutions autodiff derives from it (jax's transpose rules): the 'input gradient'
  convolves the output's gradient (the output's size, dilated by the strides) with the reversed
  kernel, the 'kernel gradient' the input with the output's gradient (as a kernel dilated by the
  strides)."""
  ones = (1,) * len(size)
  lhs_pads, rhs_pads = [], []
  for n, k, s, (lo, _), d, m in zip(size, kernel, strides, pads, dilation, out):
    dilated_kernel, dilated_out = d * (k - 1) + 1, s * (m - 1) + 1
    before = dilated_kernel - lo - 1
    lhs_pads.append((before, n + dilated_kernel - 1 - dilated_out - before))
    rhs_pads.append((lo, dilated_out - n + dilated_kernel - lo - 1))
  return {'forward': (size, kernel, strides, pads, dilation),
          'input gradient': (out, kernel, ones, tuple(lhs_pads), dilation, strides),
          'kernel gradient': (size, out, dilation, tuple(rhs_pads), strides)}


def _swapped_by_xla(size, kernel, strides, pads, dilation, out) -> bool:
  """Whether XLA swaps the operands of a convolution (no input dilation) or of either convolution
  of its gradient (`gradient_convolutions`). A strided convolution down to a map smaller than its
  kernel (ResNet-18's 3x3/2 from 4x4 to 2x2) has a swapped input gradient though its own operands
  stay as they are."""
  return any(xla_swaps_operands(*args) for args in
             gradient_convolutions(size, kernel, strides, pads, dilation, out).values())


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None) -> jax.Array:
  """`lax.conv_general_dilated` (what ConvBlock's nn.Conv calls), except for the convolutions XLA
  would run slowly on CPU: those whose operands, or whose gradient's, XLA swaps
  (`_swapped_by_xla`), which happens when an NHWC input, or the output, is spatially smaller than
  the HWIO kernel. Compiled for CPU these are a product of the input's patches with the kernel
  (`_patches_conv`), which XLA hands to Eigen like any dot, and whose gradient is slices, pads and
  dots: no convolution is left for XLA to swap, forward or backward. For 8x2x2x512 by 3x3x512x512
  the forward pass and both gradients took 27 ms against 366 (37 ms against 2.2 s at the test
  suite's lowest optimisation level; bench/bench_small_conv.py). Elsewhere, and for every other
  convolution, it is `lax.conv_general_dilated` itself: for the convolutions XLA leaves alone the
  patches product was within 20% of it at XLA's default optimisation and up to twice as slow at
  the lowest. Grouped convolutions too (the swapper leaves them alone)."""
  conv = functools.partial(lax.conv_general_dilated, window_strides=window_strides,
                           padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                           dimension_numbers=dimension_numbers,
                           feature_group_count=feature_group_count,
                           batch_group_count=batch_group_count, precision=precision,
                           preferred_element_type=preferred_element_type)
  taps = _swapped_conv_taps(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                            dimension_numbers, feature_group_count, batch_group_count)
  if taps is None:
    return conv(lhs, rhs)
  patches = functools.partial(_patches_conv, **taps, precision=precision,
                              preferred_element_type=preferred_element_type)
  return platform_dependent(lhs, rhs, cpu=patches, default=lambda x, w: conv(x, w))


def _swapped_conv_taps(lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                       feature_group_count, batch_group_count, swapped_only=True) -> dict | None:
  """`_patches_conv`'s static arguments for a convolution that XLA would swap (`_swapped_by_xla`;
  any convolution if not `swapped_only`) and that it computes (NHWC, HWIO, ungrouped, no input
  dilation, no negative padding, some kernel tap reaching the input); None for any other."""
  if lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1:
    return None
  if (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _LAYOUT)):
    return None
  if lhs_dilation is not None and tuple(lhs_dilation) != (1, 1):
    return None
  strides = tuple(strides)
  dilation = (1, 1) if rhs_dilation is None else tuple(rhs_dilation)
  size, kernel = lhs.shape[1:3], rhs.shape[:2]
  if isinstance(padding, str):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    padding = lax.padtype_to_pads(size, dilated, strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  out = tuple((n + lo + hi - d * (k - 1) - 1) // s + 1
              for n, k, s, (lo, hi), d in zip(size, kernel, strides, pads, dilation))
  if min(min(p) for p in pads) < 0 or min(out) < 1:
    return None
  if swapped_only and not _swapped_by_xla(size, kernel, strides, pads, dilation, out):
    return None
  # Kernel taps (per dim) that reach the input from some output cell: the others see only padding.
  reach = tuple(tuple(t for t in range(k) if any(0 <= o * s + t * d - lo < n for o in range(m)))
                for n, k, s, (lo, _), d, m in zip(size, kernel, strides, pads, dilation, out))
  if not all(reach):
    return None
  return dict(taps=reach, strides=strides, pads=pads, dilation=dilation, out=out)


def _kernel_taps(w: jax.Array, taps) -> jax.Array:
  """The (kh, kw, C_in, C_out) kernel's rows and columns `taps` (index tuples), by slices (a
  gather's gradient would be a scatter): one slice where both are ranges, so that the gradient
  pads once (at the lowest optimisation level XLA:CPU pads 3x3x512x512 elementwise, slowly)."""
  def contiguous(t):
    return t == tuple(range(t[0], t[-1] + 1))
  if all(contiguous(t) for t in taps):
    return lax.slice(w, (taps[0][0], taps[1][0], 0, 0),
                     (taps[0][-1] + 1, taps[1][-1] + 1, *w.shape[2:]))
  for axis, t in enumerate(taps):
    w = jnp.concatenate([lax.slice_in_dim(w, i, i + 1, axis=axis) for i in t], axis=axis)
  return w


def _patches_conv(x: jax.Array, w: jax.Array, *, taps, strides, pads, dilation, out, precision,
                  preferred_element_type) -> jax.Array:
  """An NHWC-by-HWIO convolution as im2col: the padded input's strided view under each kernel tap
  that reaches the input, side by side, (B, H', W', taps * C_in), times the kernel's rows for
  those taps, (taps * C_in, C_out). For the small maps it is used on this is a few slices and one
  dot: a 3x3 'SAME' convolution of a 1x1 map keeps its centre tap alone (a 1x1 convolution), of a
  2x2 map all nine. The patches' zeros cost less than reading the kernel more than once: one dot
  per output cell with only the taps that reach the input, or one with a block-Toeplitz matrix
  built from the kernel, took 1.3-5 times as long with their gradients on 2x2 maps.
  Same values as the convolution up to summation order; autodiff gives its gradient."""
  batch = x.shape[0]
  padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  views = []
  for i in taps[0]:
    for j in taps[1]:
      start = (0, i * dilation[0], j * dilation[1], 0)
      limit = (batch, start[1] + strides[0] * (out[0] - 1) + 1,
               start[2] + strides[1] * (out[1] - 1) + 1, x.shape[3])
      views.append(lax.slice(padded, start, limit, (1, *strides, 1)))
  patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
  kernel = _kernel_taps(w, taps)
  # (B, H', W', taps * C_in) by (taps * C_in, C_out), the batch left whole for a sharded step.
  return lax.dot_general(patches, kernel.reshape(-1, w.shape[3]), (((3,), (0,)), ((), ())),
                         precision=precision, preferred_element_type=preferred_element_type)
