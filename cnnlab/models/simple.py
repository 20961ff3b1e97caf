"""Small classic networks: simple_cnn, lenet5, and conv_stack (the ablation workhorse)."""

from __future__ import annotations

from typing import Any, Sequence, Union

import flax.linen as nn
import jax

from cnnlab import geometry
from cnnlab.layers import (POOLS, ConvBlock, GlobalPool, activation, as_logits, check_choice,
                           make_pool)
from cnnlab.models.registry import check_num_classes, register


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape((x.shape[0], -1))


@register('simple_cnn', input_shape=(32, 32, 3), num_classes=10)
class SimpleCNN(nn.Module):
  """The classic: conv 5x5 x5 -> max-pool 2 -> conv 5x5 x10 -> max-pool 2 -> dense 32 -> dense.

  10,002 parameters on 32x32x3 with 10 classes; works on 28x28x1 too (VALID convolutions).
  """
  num_classes: int = 10
  features: Sequence[int] = (5, 10)
  kernel_size: int = 5
  hidden: int = 32
  pool: str = 'max'
  act: str = 'relu'
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, features in enumerate(self.features, start=1):
      x = ConvBlock(features, self.kernel_size, padding='VALID', norm='none', act=self.act,
                    dtype=self.dtype, name=f'conv{i}')(x, train)
      pool = make_pool(self.pool, 2, name=f'pool{i}')
      x = x if pool is None else pool(x)
      self.sow('intermediates', f'stage{i}', x)
    x = activation(self.act)(nn.Dense(self.hidden, dtype=self.dtype, name='fc1')(_flatten(x)))
    return as_logits(nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x))


@register('lenet5', input_shape=(32, 32, 1), num_classes=10)
class LeNet5(nn.Module):
  """LeCun et al. 1998: C1 conv 6@5x5 -> S2 pool -> C3 conv 16@5x5 -> S4 pool -> 120 -> 84 -> out.

  Classic by default (tanh, average pooling); `act='relu', pool='max'` is the modern variant.
  61,706 parameters on 32x32x1 with 10 classes. On 28x28 inputs use padding=2 (as for MNIST).
  """
  num_classes: int = 10
  act: str = 'tanh'
  pool: str = 'avg'
  padding: geometry.PaddingLike = 'VALID'
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, (features, padding) in enumerate(((6, self.padding), (16, 'VALID')), start=1):
      x = ConvBlock(features, 5, padding=padding, norm='none', act=self.act, dtype=self.dtype,
                    name=f'conv{i}')(x, train)
      pool = make_pool(self.pool, 2, name=f'pool{i}')
      x = x if pool is None else pool(x)
      self.sow('intermediates', f'stage{i}', x)
    x = _flatten(x)
    for i, features in enumerate((120, 84), start=1):
      x = activation(self.act)(nn.Dense(features, dtype=self.dtype, name=f'fc{i}')(x))
    return as_logits(nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x))


PerStage = Union[Any, Sequence[Any]]


@register('conv_stack', input_shape=(28, 28, 1), num_classes=10)
class ConvStack(nn.Module):
  """A fully parameterised stack of convolution stages, for ablations.

  Stage i: `convs_per_stage` ConvBlocks of filters[i] channels (the first one carries the stride),
  then a pool layer. Every per-stage argument takes one value for all stages or a sequence with
  one value per stage. `pool='none'` with `stride=2` is the strided-convolution substitute for
  pooling. Head: global average/max pooling or flattening, optional hidden dense layers, dropout,
  then the classifier.

  Attributes:
    filters: channels per stage; its length is the number of stages.
    kernel_size, stride, padding ('VALID' | 'SAME' | 'FULL' | int), pool ('max' | 'avg' | 'none'),
    pool_size, pool_stride (None: = pool_size): per stage.
    norm: 'batch' | 'group' | 'layer' | 'none'.  act: activation name.
    head: 'global_avg' | 'global_max' | 'flatten'.  hidden: dense widths before the classifier.
    dropout: rate before each dense layer.
    num_classes: 0 returns the pooled pre-logits features (B, D) (after `hidden`), with no
      classifier layer: timm's backbone convention.
    features_only: return the per-stage feature maps [(B, H_i, W_i, filters[i]), ...] (after each
      stage's pool; `feature_reductions()` gives their strides), with no head layers at all.
  """
  num_classes: int = 10
  filters: Sequence[int] = (32, 64)
  convs_per_stage: int = 1
  kernel_size: PerStage = 3
  stride: PerStage = 1
  padding: PerStage = 'SAME'
  pool: PerStage = 'max'
  pool_size: PerStage = 2
  pool_stride: PerStage = None
  norm: str = 'batch'
  act: str = 'relu'
  head: str = 'global_avg'
  hidden: Sequence[int] = ()
  dropout: float = 0.0
  dtype: Any = None
  bn_axis_name: str | None = None
  features_only: bool = False

  def __post_init__(self):
    check_num_classes(self.num_classes, zero_ok=True)
    if not self.filters:
      raise ValueError('filters must name at least one stage')
    for f in self.filters:
      geometry.check_positive('filters', f)
    geometry.check_positive('convs_per_stage', self.convs_per_stage)
    for name in ('kernel_size', 'stride', 'pool_size'):
      for v in self.per_stage(name):
        geometry.check_positive(name, v)
    for v in self.per_stage('pool_stride'):
      if v is not None:
        geometry.check_positive('pool_stride', v)
    for v in self.per_stage('padding'):
      geometry.check_padding(v)
    for v in self.per_stage('pool'):
      check_choice('pool', v, POOLS)
    check_choice('head', self.head, ('global_avg', 'global_max', 'flatten'))
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'dropout must be in [0, 1), got {self.dropout}')
    super().__post_init__()

  def per_stage(self, name: str) -> list[Any]:
    """`name`'s value for each stage; ValueError if a sequence has the wrong length."""
    value = getattr(self, name)
    if isinstance(value, (list, tuple)):
      if len(value) != len(self.filters):
        raise ValueError(f'{name} has {len(value)} values but there are {len(self.filters)} '
                         f'stages (filters={tuple(self.filters)})')
      return list(value)
    return [value] * len(self.filters)

  def feature_reductions(self) -> list[int]:
    """Each stage's output stride relative to the input (timm's feature_info.reduction()): the
    product of the conv strides and pool strides so far."""
    reductions, total = [], 1
    for stride, pool, size, pool_stride in zip(*(self.per_stage(n) for n in (
        'stride', 'pool', 'pool_size', 'pool_stride'))):
      total *= stride * (1 if pool == 'none' else pool_stride or size)
      reductions.append(total)
    return reductions

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | list[jax.Array]:
    """Images (B, H, W, C) -> logits (B, num_classes); see num_classes and features_only."""
    stages = zip(self.filters, *(self.per_stage(n) for n in (
        'kernel_size', 'stride', 'padding', 'pool', 'pool_size', 'pool_stride')))
    feature_maps = []
    for i, (features, kernel, stride, padding, pool, pool_size, pool_stride) in enumerate(stages, 1):
      for j in range(1, self.convs_per_stage + 1):
        x = ConvBlock(features, kernel, stride if j == 1 else 1, padding=padding, norm=self.norm,
                      act=self.act, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                      name=f'stage{i}_conv{j}')(x, train)
      pool_layer = make_pool(pool, pool_size, pool_stride, name=f'stage{i}_pool')
      x = x if pool_layer is None else pool_layer(x)
      self.sow('intermediates', f'stage{i}', x)
      feature_maps.append(x)
    if self.features_only:
      return feature_maps
    if self.head == 'flatten':
      x = _flatten(x)
    else:
      x = GlobalPool('avg' if self.head == 'global_avg' else 'max', name='global_pool')(x)
    for i, features in enumerate(self.hidden, start=1):
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
      x = activation(self.act)(nn.Dense(features, dtype=self.dtype, name=f'fc{i}')(x))
    self.sow('intermediates', 'pre_logits', x)
    if self.num_classes == 0:
      return x
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return as_logits(nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x))
