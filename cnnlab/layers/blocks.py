"""Residual blocks (ResNet's basic and bottleneck) and GoogLeNet's Inception block.

Blocks take a `conv` argument (a `ConvBlock` partial carrying norm, dtype and batch-norm axis), as
Flax's ImageNet example does, so a model binds those settings once.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab import geometry
from cnnlab.layers.common import (ModuleDef, activation, check_choice, layer_name, relu,
                                  relu_backward_mode)
from cnnlab.layers.conv import ConvBlock
from cnnlab.layers.pool import Pool

def _check_residual(block) -> None:
  """The arguments every residual block shares, checked when the block is defined."""
  geometry.check_positive('features', block.features)
  geometry.check_positive('strides', block.strides)
  check_choice('shortcut', block.shortcut, ('projection', 'pad'))


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
    _check_residual(self)
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
    _check_residual(self)
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
  (bench/README.md, "Batch norm and residual outputs"). Under `relu_backward('guided' |
  'deconvnet')` it is `relu(y + shortcut)`, whose backward pass that mode replaces.
  """
  if act == 'relu' or act is nn.relu or act is relu:
    if relu_backward_mode() != 'default':
      return relu(y + shortcut)
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
