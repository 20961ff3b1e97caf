"""U-Net (Ronneberger, Fischer & Brox 2015): a convolutional encoder-decoder with skip connections,
for per-pixel classification."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab import geometry
from cnnlab.layers import (NORMS, ConvBlock, Pool, UpBlock, activation, as_logits, check_choice,
                           conv_block)
from cnnlab.layers.upsample import Resize
from cnnlab.models.registry import check_num_classes, register

UPSAMPLES = ('transpose', 'bilinear')


@register('unet', input_shape=(64, 64, 3), num_classes=5, task='segmentation')
class UNet(nn.Module):
  """Encoder level i: two 3x3 ConvBlocks of features[i] channels ('down{i}_conv1', '_conv2'), then
  2x2 max pooling ('down{i}_pool') except after the last (the bottleneck). Decoder level i, from the
  deepest: upsample by 2 to features[i] channels ('up{i}': a 2x2 stride-2 transposed convolution,
  or with upsample='bilinear' jax.image.resize then a 3x3 convolution; both linear, as the paper's
  up-convolution), concatenate the encoder's level-i map before it, two 3x3 ConvBlocks
  ('up{i}_conv1', '_conv2'). A 1x1 convolution 'head' gives the class scores. SAME padding, so
  the output has the input's size (the paper's VALID convolutions crop it).

  Attributes:
    num_classes: classes per pixel (segmentation of `shapes`: its classes + 1 background).
    features: channels per level; its length is the depth. H and W must be divisible by
      2 ** (len(features) - 1).
    upsample: 'transpose' | 'bilinear'.  norm: 'batch' | 'group' | 'layer' | 'none'.
    act: activation name.  dtype: compute dtype.  bn_axis_name: pmap's batch-norm axis.
  Input (B, H, W, C) -> logits (B, H, W, num_classes), float32.
  """
  num_classes: int = 5
  features: Sequence[int] = (32, 64, 128)
  upsample: str = 'transpose'
  norm: str = 'batch'
  act: str = 'relu'
  dtype: Any = None
  bn_axis_name: str | None = None

  def __post_init__(self):
    check_num_classes(self.num_classes)
    if not self.features:
      raise ValueError('features must name at least one level')
    for f in self.features:
      geometry.check_positive('features', f)
    check_choice('upsample', self.upsample, UPSAMPLES)
    check_choice('norm', self.norm, NORMS)
    activation(self.act)
    super().__post_init__()

  @property
  def divisor(self) -> int:
    """What H and W must be multiples of: every pooling halves them exactly."""
    return 2 ** (len(self.features) - 1)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Images (B, H, W, C) -> per-pixel logits (B, H, W, num_classes)."""
    h, w = x.shape[1:3]
    if h % self.divisor or w % self.divisor:
      raise ValueError(f'unet: input size {h}x{w} must be divisible by {self.divisor} '
                       f'(2 ** (levels - 1) for {len(self.features)} levels: features='
                       f'{tuple(self.features)}), so that every pooling halves it exactly; pad or '
                       'resize the images, or use fewer levels')
    conv = conv_block(norm=self.norm, act=self.act, dtype=self.dtype,
                      bn_axis_name=self.bn_axis_name)
    levels = len(self.features)
    skips = []
    for i, features in enumerate(self.features, start=1):
      x = conv(features, 3, name=f'down{i}_conv1')(x, train)
      x = conv(features, 3, name=f'down{i}_conv2')(x, train)
      self.sow('intermediates', f'encoder{i}', x)
      if i < levels:
        skips.append(x)
        x = Pool('max', 2, name=f'down{i}_pool')(x)
    for i in reversed(range(1, levels)):  # the deepest decoder level first
      features, skip = self.features[i - 1], skips[i - 1]
      if self.upsample == 'transpose':
        x = UpBlock(features, 2, 2, norm='none', act='none', dtype=self.dtype, name=f'up{i}')(x)
      else:
        x = Resize(2, 'bilinear', name=f'up{i}_resize')(x)
        x = conv(features, 3, norm='none', act='none', name=f'up{i}')(x, train)
      x = jnp.concatenate([skip, x.astype(skip.dtype)], axis=-1)
      x = conv(features, 3, name=f'up{i}_conv1')(x, train)
      x = conv(features, 3, name=f'up{i}_conv2')(x, train)
      self.sow('intermediates', f'decoder{i}', x)
    x = ConvBlock(self.num_classes, 1, norm='none', act='none', dtype=self.dtype,
                  name='head')(x, train)
    return as_logits(x)
