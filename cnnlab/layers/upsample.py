"""Learnable upsampling for decoders: transposed convolution (PyTorch's ConvTranspose2d sizes)."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab import geometry
from cnnlab.layers.common import NORMS, activation, check_choice, check_output, spatial_input
from cnnlab.layers.norm import normalization

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
    spatial_input(self, x)
    k, s, d = self.kernel_size, self.strides, self.dilation
    out = [geometry.conv_transpose_output_size(n, k, s, self.padding, d, self.output_padding)
           for n in x.shape[1:3]]
    check_output(self, x, out, f'a {k}x{k} transposed convolution with padding {self.padding}')
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
