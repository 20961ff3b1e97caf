"""ConvBlock: convolution, then optional normalisation, then activation."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab import geometry
from cnnlab.layers.common import (IntOrPair, ModuleDef, NORMS, activation, check_choice,
                                  check_output, he_normal_fan_out, layer_name, pair, spatial_input)
from cnnlab.layers.norm import normalization

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
                param_dtype=self.param_dtype, kernel_init=self.kernel_init, name='conv')(x)
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
