"""Classifier heads: GoogLeNet's auxiliary classifier and the dense stack of AlexNet and VGG, and
the dtype a model's logits leave it in."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.layers.common import ModuleDef, activation, relu
from cnnlab.layers.conv import ConvBlock
from cnnlab.layers.pool import AdaptiveAvgPool


def as_logits(x: jax.Array) -> jax.Array:
  """Logits in float32 at least: a bfloat16 or float16 model's are widened for the loss, a
  float64 model's (the float64 reference step) stay float64."""
  return x.astype(jnp.float64 if x.dtype == jnp.float64 else jnp.float32)


class AuxHead(nn.Module):
  """GoogLeNet's auxiliary classifier (torchvision's InceptionAux).

  4x4 adaptive average pool -> 1x1 conv (128) -> flatten -> dense 1024 -> ReLU -> dropout 0.7 ->
  dense num_classes. Input (B, H, W, C) -> logits (B, num_classes).
  """
  num_classes: int
  conv: ModuleDef = ConvBlock
  pool_size: int = 4
  proj_features: int = 128
  hidden: int = 1024
  dropout: float = 0.7
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = AdaptiveAvgPool(self.pool_size, name='pool')(x)
    x = self.conv(self.proj_features, 1, padding=0, name='conv')(x, train)
    x = x.reshape((x.shape[0], -1))
    x = relu(nn.Dense(self.hidden, dtype=self.dtype, name='fc1')(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='fc2')(x)


class MLPHead(nn.Module):
  """Classifier of AlexNet/VGG: flatten -> [dense -> act] per hidden width -> dense num_classes.

  Dropout of `dropout` goes before each hidden dense layer (`dropout_first`, AlexNet) or after
  each activation (VGG). Input (B, ...) -> logits (B, num_classes).
  """
  num_classes: int
  hidden: Sequence[int] = (4096, 4096)
  dropout: float = 0.5
  dropout_first: bool = False
  act: str = 'relu'
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    drop = nn.Dropout(self.dropout, deterministic=not train)
    for i, features in enumerate(self.hidden, start=1):
      x = drop(x) if self.dropout_first else x
      x = activation(self.act)(nn.Dense(features, dtype=self.dtype, name=f'fc{i}')(x))
      x = x if self.dropout_first else drop(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='fc_out')(x)
