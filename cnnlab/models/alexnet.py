"""AlexNet (Krizhevsky et al. 2012), in torchvision's single-tower form (61,100,840 parameters)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from cnnlab.layers import AdaptiveAvgPool, ConvBlock, MLPHead, Pool, as_logits
from cnnlab.models.registry import register

# (features, kernel, stride, padding, max-pool 3/2 after it)
_FEATURES = ((64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False),
             (256, 3, 1, 1, False), (256, 3, 1, 1, True))


@register('alexnet', input_shape=(224, 224, 3), num_classes=1000)
class AlexNet(nn.Module):
  """Five convolutions (ReLU, three 3/2 max-pools), 6x6 adaptive average pool, three dense layers.

  `norm='batch'` adds batch norm after every convolution (not in the original).
  """
  num_classes: int = 1000
  dropout: float = 0.5
  hidden: int = 4096
  pool_size: int = 6
  norm: str = 'none'
  dtype: Any = None
  bn_axis_name: str | None = None  # pmap axis for cross-replica batch statistics (norm='batch')

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, (features, kernel, stride, padding, pool) in enumerate(_FEATURES, start=1):
      x = ConvBlock(features, kernel, stride, padding=padding, norm=self.norm, use_bias=True,
                    dtype=self.dtype, bn_axis_name=self.bn_axis_name, name=f'conv{i}')(x, train)
      if pool:
        x = Pool('max', 3, 2, name=f'pool{i}')(x)
      self.sow('intermediates', f'features{i}', x)
    x = AdaptiveAvgPool(self.pool_size, name='avgpool')(x)
    x = MLPHead(self.num_classes, (self.hidden, self.hidden), self.dropout, dropout_first=True,
                dtype=self.dtype, name='classifier')(x, train)
    return as_logits(x)
