"""Learnable upsampling for decoders: transposed convolution (PyTorch's ConvTranspose2d sizes), and
the bilinear kernel that makes one interpolate (Long et al. 2015's initialisation)."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import default_kernel_init

from cnnlab import geometry
from cnnlab.layers.common import (NORMS, IntOrPair, activation, check_choice, check_output,
                                  spatial_input)
from cnnlab.layers.norm import normalization


def bilinear_filter(size: int) -> np.ndarray:
  """(size,) weights of 1-D linear interpolation (Caffe's/FCN's `upsample_filt`): a triangle of
  half-width factor = ceil(size / 2) centred on the middle tap. The transposed convolution with
  stride `factor` and this kernel interpolates linearly between input samples."""
  factor = (size + 1) // 2
  center = factor - 1 if size % 2 == 1 else factor - 0.5
  return (1 - np.abs(np.arange(size) - center) / factor).astype(np.float32)


def bilinear_kernel_init(key: jax.Array, shape, dtype: Any = jnp.float32) -> jax.Array:
  """Initialiser of a transposed-convolution kernel (kh, kw, C, C) to bilinear interpolation of
  each channel on its own (the kernel is diagonal in the channels; `key` is not used).

  For nn.ConvTranspose / UpBlock with kernel 2f (2f - 1 for odd f), stride f and padding f // 2
  (`upsampling_geometry(f)`), the output equals `jax.image.resize(x, ..., 'bilinear')` except on
  the f // 2 border pixels of each side, where the resize clamps to the edge and the convolution
  sees zero padding.
  """
  del key  # deterministic
  kh, kw, c_out, c_in = shape
  if c_out != c_in:
    raise ValueError(f'bilinear_kernel_init needs as many input as output channels (each channel '
                     f'is interpolated on its own), got a kernel of shape {tuple(shape)}')
  taps = np.outer(bilinear_filter(kh), bilinear_filter(kw))  # (kh, kw)
  kernel = taps[:, :, None, None] * np.eye(c_out, dtype=np.float32)[None, None]
  return jnp.asarray(kernel, dtype)


def upsampling_geometry(factor: int) -> tuple[int, int]:
  """(kernel_size, padding) of the transposed convolution that upsamples by `factor` (stride):
  an n-cell input gives exactly n * factor cells, and output cell j sits at input coordinate
  (j + 0.5) / factor - 0.5 as in jax.image.resize. Kernel 2f as Long et al. (2f - 1 for odd f,
  whose triangle must peak on a cell)."""
  geometry.check_positive('factor', factor)
  return 2 * factor - factor % 2, factor // 2


class UpBlock(nn.Module):
  """Learnable upsampling: transposed convolution, then optional norm and activation.

  Output size follows PyTorch's ConvTranspose2d:
  (n - 1) * strides - 2 * padding + dilation * (kernel - 1) + output_padding + 1
  (see geometry.conv_transpose_output_size). Input (B, H, W, C) -> (B, H', W', features).

  Attributes:
    output_padding: an int, or (h, w) to reach a different size per dim (each < strides or
      dilation).
    kernel_init: the kernel's initialiser; `bilinear_kernel_init` makes the block start as
      bilinear interpolation (features must equal the input channels).
    learnable: False keeps the kernel fixed at `kernel_init(key(0), ...)` as a constant, not a
      parameter (Long et al.'s final, fixed bilinear upsampling); a bias, if any, is still learnt.
    bn_axis_name: pmap axis for cross-replica batch statistics (norm='batch').
  """
  features: int
  kernel_size: int = 2
  strides: int = 2
  padding: int = 0
  output_padding: IntOrPair = 0
  dilation: int = 1
  norm: str = 'batch'
  act: str | Callable = 'relu'
  use_bias: bool | None = None
  kernel_init: Callable = default_kernel_init
  learnable: bool = True
  bn_axis_name: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ('features', 'kernel_size', 'strides', 'dilation'):
      geometry.check_positive(name, getattr(self, name))
    output_padding = self._output_padding()
    if self.padding < 0 or min(output_padding) < 0:
      raise ValueError(f'padding and output_padding must be >= 0, got {self.padding}, '
                       f'{self.output_padding}')
    if max(output_padding) >= max(self.strides, self.dilation):
      raise ValueError(f'output_padding ({self.output_padding}) must be smaller than strides or '
                       'dilation')
    check_choice('norm', self.norm, NORMS)
    activation(self.act)
    super().__post_init__()

  def _output_padding(self) -> tuple[int, int]:
    op = self.output_padding
    values = (op, op) if isinstance(op, int) else tuple(op)
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
      raise ValueError(f'output_padding must be an int or an (h, w) pair of ints, got {op!r}')
    return values  # type: ignore[return-value]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    spatial_input(self, x)
    k, s, d = self.kernel_size, self.strides, self.dilation
    output_padding = self._output_padding()
    out = [geometry.conv_transpose_output_size(n, k, s, self.padding, d, op)
           for n, op in zip(x.shape[1:3], output_padding)]
    check_output(self, x, out, f'a {k}x{k} transposed convolution with padding {self.padding}')
    # A transposed convolution is a convolution over the stride-dilated input padded by
    # d(k-1) - p on each side (plus output_padding at the end).
    lo = d * (k - 1) - self.padding
    pads = [(lo, lo + op) for op in output_padding]
    use_bias = (self.norm == 'none') if self.use_bias is None else self.use_bias
    if self.learnable:
      x = nn.ConvTranspose(self.features, (k, k), (s, s), padding=pads, kernel_dilation=(d, d),
                           use_bias=use_bias, transpose_kernel=True, dtype=self.dtype,
                           param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                           name='conv')(x)
    else:
      # nn.ConvTranspose's computation with a constant kernel (kh, kw, out, in), so a fixed block
      # computes exactly what a learnable one with the same kernel does.
      kernel = self.kernel_init(jax.random.key(0), (k, k, self.features, x.shape[-1]),
                                self.param_dtype)
      x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
      x = jax.lax.conv_transpose(x, kernel, (s, s), pads, rhs_dilation=(d, d),
                                 transpose_kernel=True)
      if use_bias:
        bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
        x = x + bias.astype(x.dtype)
    x = normalization(self.norm, train=train, features=self.features, axis_name=self.bn_axis_name,
                      dtype=self.dtype, param_dtype=self.param_dtype)(x)
    fn = activation(self.act)
    return x if fn is None else fn(x)


class Resize(nn.Module):
  """Fixed upsampling by an integer factor with jax.image.resize (half-pixel centres, edges
  clamped): (B, H, W, C) -> (B, factor H, factor W, C). A module rather than a bare function so
  that `cnnlab.analysis` sees the map change grid (it has no receptive field of its own).
  """
  factor: int = 2
  method: str = 'bilinear'

  def __post_init__(self):
    geometry.check_positive('factor', self.factor)
    check_choice('method', self.method, ('nearest', 'bilinear', 'cubic'))
    super().__post_init__()

  def __call__(self, x: jax.Array) -> jax.Array:
    spatial_input(self, x)
    b, h, w, c = x.shape
    return jax.image.resize(x, (b, self.factor * h, self.factor * w, c), self.method)
