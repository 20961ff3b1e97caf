"""GoogLeNet / Inception v1 (Szegedy et al. 2014), torchvision-compatible."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.layers import AuxHead, GlobalPool, InceptionBlock, Pool, as_logits, conv_block
from cnnlab.models.registry import register

# name: (ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj); 'pool' is a 3x3/2 max-pool (2x2/2
# before stage 5), 'aux' an auxiliary classifier on the previous block's output.
_LAYOUT = (
    ('inception3a', (64, 96, 128, 16, 32, 32)), ('inception3b', (128, 128, 192, 32, 96, 64)),
    ('pool3', 3),
    ('inception4a', (192, 96, 208, 16, 48, 64)), ('aux1', None),
    ('inception4b', (160, 112, 224, 24, 64, 64)), ('inception4c', (128, 128, 256, 24, 64, 64)),
    ('inception4d', (112, 144, 288, 32, 64, 64)), ('aux2', None),
    ('inception4e', (256, 160, 320, 32, 128, 128)),
    ('pool4', 2),
    ('inception5a', (256, 160, 320, 32, 128, 128)), ('inception5b', (384, 192, 384, 48, 128, 128)),
)

# ImageNet's per-channel mean and std (0..1 scale), the normalisation torchvision's models take.
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@register('googlenet', input_shape=(224, 224, 3), num_classes=1000)
class GoogLeNet(nn.Module):
  """Inception v1 with batch norm (torchvision's `googlenet`): 6,624,904 parameters for 1000
  classes, 13,004,888 with the two auxiliary classifiers.

  aux_logits: build the auxiliary heads (after 4a and 4d). They run only when training (and at
    init, so their parameters exist), and their logits are sown as 'intermediates/aux1_logits'
    and 'aux2_logits' for the training loss (GoogLeNet weights them 0.3).
  branch3_kernel: 3 as torchvision (whose weights and counts we match), 5 as in the paper.
  transform_input: torchvision's `transform_input`: the input, normalised with ImageNet's mean and
    std, is first re-normalised to (x - 0.5) / 0.5 per channel, which torchvision's ImageNet
    GoogLeNet weights were trained on (torchvision turns it on when it loads them).
  """
  num_classes: int = 1000
  aux_logits: bool = True
  dropout: float = 0.2
  aux_dropout: float = 0.7
  branch3_kernel: int = 3
  norm: str = 'batch'
  bn_epsilon: float = 1e-3
  transform_input: bool = False
  dtype: Any = None
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = conv_block(norm=self.norm, bn_epsilon=self.bn_epsilon, dtype=self.dtype,
                      bn_axis_name=self.bn_axis_name)
    if self.transform_input:
      if x.shape[-1] != 3:
        raise ValueError(f'{type(self).__name__}: transform_input re-normalises RGB images, got '
                         f'input of shape {x.shape} ({x.shape[-1]} channels)')
      # x = (p - mean) / std  ->  (p - 0.5) / 0.5 = x * std / 0.5 + (mean - 0.5) / 0.5, as
      # torchvision computes it. An affine map of the input cannot be folded into conv1: its zero
      # padding would then stand for another value than the border's.
      scale = jnp.asarray([s / 0.5 for s in _IMAGENET_STD], x.dtype)
      shift = jnp.asarray([(m - 0.5) / 0.5 for m in _IMAGENET_MEAN], x.dtype)
      x = x * scale + shift  # (B, H, W, 3)
    x = conv(64, 7, 2, padding=3, name='conv1')(x, train)
    x = Pool('max', 3, 2, ceil_mode=True, name='pool1')(x)
    x = conv(64, 1, padding=0, name='conv2')(x, train)
    x = conv(192, 3, padding=1, name='conv3')(x, train)
    x = Pool('max', 3, 2, ceil_mode=True, name='pool2')(x)
    self.sow('intermediates', 'stem', x)
    run_aux = self.aux_logits and (train or self.is_initializing())
    for name, arg in _LAYOUT:
      if name.startswith('inception'):
        x = InceptionBlock(*arg, branch3_kernel=self.branch3_kernel, conv=conv, name=name)(x, train)
        self.sow('intermediates', f'{name}_out', x)
      elif name.startswith('pool'):
        x = Pool('max', arg, 2, ceil_mode=True, name=name)(x)
      elif run_aux:
        aux = AuxHead(self.num_classes, conv=conv, dropout=self.aux_dropout, dtype=self.dtype,
                      name=name)(x, train)
        self.sow('intermediates', f'{name}_logits', as_logits(aux))
    x = GlobalPool('avg', name='global_pool')(x)
    self.sow('intermediates', 'pre_logits', x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return as_logits(nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x))
