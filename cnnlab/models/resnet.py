"""ResNets (He et al. 2015): the ImageNet family (v1.5, torchvision-compatible) and CIFAR ResNets."""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax

from cnnlab.layers import (BasicBlock, Bottleneck, GlobalPool, Pool, as_logits, check_choice,
                           conv_block)
from cnnlab.models.registry import check_num_classes, register

ModuleDef = Any


class ResNet(nn.Module):
  """A stem, then stages of residual blocks (stage i has widths[i] channels, the first block of
  every stage after the first halves the resolution), global average pooling, a dense classifier.

  stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'cifar' (3x3/1 conv, no pool).
  shortcut: 'projection' (1x1 conv when the shape changes) or 'pad' (the CIFAR paper's option A).
  zero_init_last: zero the last norm scale of every block, so each starts as the identity.
  Layer names: stem_conv, stem_pool, stage{i}_block{j}/conv{k}, head.
  num_classes=0 returns the pooled features (B, widths[-1] * expansion) with no `head` layer, and
  features_only=True the per-stage maps [(B, H_i, W_i, C_i), ...] after each stage (strides:
  `feature_reductions()`) with no pooling or head: timm's backbone conventions.
  """
  stage_sizes: Sequence[int]
  block: ModuleDef = BasicBlock
  num_classes: int = 1000
  widths: Sequence[int] = (64, 128, 256, 512)
  stem: str = 'imagenet'
  stem_width: int | None = None  # default: widths[0]
  shortcut: str = 'projection'
  zero_init_last: bool = False
  norm: str = 'batch'
  act: str = 'relu'
  dtype: Any = None
  bn_axis_name: str | None = None
  features_only: bool = False

  def __post_init__(self):
    check_choice('stem', self.stem, ('imagenet', 'cifar'))
    check_num_classes(self.num_classes, zero_ok=True)
    if len(self.widths) != len(self.stage_sizes):
      raise ValueError(f'widths {tuple(self.widths)} must have one entry per stage '
                       f'(stage_sizes={tuple(self.stage_sizes)})')
    super().__post_init__()

  def feature_reductions(self) -> list[int]:
    """Each stage's output stride relative to the input (timm's feature_info.reduction()): the
    stem's (4 for 'imagenet', 1 for 'cifar'), doubled by every stage after the first."""
    stem = 4 if self.stem == 'imagenet' else 1
    return [stem * 2 ** i for i in range(len(self.stage_sizes))]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | list[jax.Array]:
    """Images (B, H, W, C) -> logits (B, num_classes); see num_classes and features_only."""
    conv = conv_block(norm=self.norm, act=self.act, dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    stem_width = self.stem_width or self.widths[0]
    if self.stem == 'imagenet':
      x = conv(stem_width, 7, 2, padding=3, name='stem_conv')(x, train)
      x = Pool('max', 3, 2, padding=1, name='stem_pool')(x)
    else:
      x = conv(stem_width, 3, 1, padding=1, name='stem_conv')(x, train)
    self.sow('intermediates', 'stem', x)
    feature_maps = []
    for i, (depth, width) in enumerate(zip(self.stage_sizes, self.widths), start=1):
      for j in range(1, depth + 1):
        strides = 2 if i > 1 and j == 1 else 1
        x = self.block(width, strides, conv=conv, zero_init_last=self.zero_init_last,
                       shortcut=self.shortcut, act=self.act, name=f'stage{i}_block{j}')(x, train)
      self.sow('intermediates', f'stage{i}', x)
      feature_maps.append(x)
    if self.features_only:
      return feature_maps
    x = GlobalPool('avg', name='global_pool')(x)
    self.sow('intermediates', 'pre_logits', x)
    if self.num_classes == 0:
      return x
    return as_logits(nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x))


_IMAGENET = {18: ((2, 2, 2, 2), BasicBlock), 34: ((3, 4, 6, 3), BasicBlock),
             50: ((3, 4, 6, 3), Bottleneck), 101: ((3, 4, 23, 3), Bottleneck),
             152: ((3, 8, 36, 3), Bottleneck)}
for _depth, (_stages, _block) in _IMAGENET.items():
  register(f'resnet{_depth}')(partial(ResNet, stage_sizes=_stages, block=_block))

# CIFAR ResNets: depth 6n + 2, three stages of n basic blocks with 16/32/64 filters, option-A
# shortcuts (0.27M parameters for resnet20, as in the paper).
for _depth in (20, 32, 44, 56, 110):
  register(f'resnet{_depth}', input_shape=(32, 32, 3), num_classes=10)(partial(
      ResNet, stage_sizes=((_depth - 2) // 6,) * 3, block=BasicBlock, widths=(16, 32, 64),
      stem='cifar', shortcut='pad', num_classes=10))
