"""VGG (Simonyan & Zisserman 2014): stacks of 3x3 convolutions, torchvision-compatible counts."""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax

from cnnlab.layers import AdaptiveAvgPool, ConvBlock, MLPHead, Pool, as_logits
from cnnlab.models.registry import register

# Convolutions per stage; every stage ends with a 2x2 max-pool. Widths 64, 128, 256, 512, 512.
DEPTHS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}


class VGG(nn.Module):
  """VGG-N: stages of 3x3 convolutions (with bias, as torchvision) and 2x2 max-pools, then
  7x7 adaptive average pooling and a 4096-4096 classifier with dropout.

  `norm='batch'` gives the `_bn` variants. For small inputs (CIFAR) set `pool_size=1` and a
  smaller `hidden` to avoid a 25,088-wide dense layer fed by a replicated 1x1 map.
  """
  stage_sizes: Sequence[int]
  num_classes: int = 1000
  widths: Sequence[int] = (64, 128, 256, 512, 512)
  norm: str = 'none'
  hidden: int = 4096
  dropout: float = 0.5
  pool_size: int = 7
  dtype: Any = None
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, (depth, width) in enumerate(zip(self.stage_sizes, self.widths), start=1):
      for j in range(1, depth + 1):
        x = ConvBlock(width, 3, padding=1, norm=self.norm, use_bias=True, dtype=self.dtype,
                      bn_axis_name=self.bn_axis_name, name=f'stage{i}_conv{j}')(x, train)
      x = Pool('max', 2, 2, name=f'stage{i}_pool')(x)
      self.sow('intermediates', f'stage{i}', x)
    x = AdaptiveAvgPool(self.pool_size, name='avgpool')(x)
    x = MLPHead(self.num_classes, (self.hidden, self.hidden), self.dropout, dtype=self.dtype,
                name='classifier')(x, train)
    return as_logits(x)


for _depth, _stages in DEPTHS.items():
  register(f'vgg{_depth}')(partial(VGG, stage_sizes=_stages))
  register(f'vgg{_depth}_bn')(partial(VGG, stage_sizes=_stages, norm='batch'))
