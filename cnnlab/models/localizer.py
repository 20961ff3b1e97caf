"""Classification + localisation of one object: a class and a box regressed from a backbone's pooled
features (the "localisation as regression" of Sermanet et al. 2013's OverFeat and of the course
notes)."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from cnnlab.layers import activation, as_logits
from cnnlab.models.backbone import build_backbone, check_backbone, freeze_args
from cnnlab.models.registry import check_num_classes, register


def box_from_centre_size(raw: jax.Array) -> jax.Array:
  """(B, 4) unconstrained (cy, cx, h, w) -> (B, 4) (ymin, xmin, ymax, xmax) in [0, 1].

  A sigmoid puts the centre and the size in [0, 1]; the corners are centre -/+ size / 2, clipped
  to the image. The size is >= 0 and clipping is monotone, so min <= max by construction.
  """
  cy, cx, h, w = jnp.moveaxis(jax.nn.sigmoid(raw), -1, 0)
  box = jnp.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=-1)
  return jnp.clip(box, 0.0, 1.0)


@register('localizer', input_shape=(64, 64, 3), num_classes=4, task='localization')
class Localizer(nn.Module):
  """A backbone's pooled features (B, D) feed two dense heads: 'class_head' -> logits and
  'box_head' -> the box (through an optional hidden layer 'box_hidden').

  Attributes:
    num_classes: object classes.
    backbone: a registered model following timm's conventions (conv_stack, resnet18, ...; see
      cnnlab.models.backbone), built with num_classes=0 as the child 'backbone'.
    backbone_args: the backbone's own arguments, over BACKBONE_DEFAULTS (conv_stack: five
      stages of 32, 64, 128, 128, 256 filters for 64x64 images).
    box_hidden: width of a hidden dense layer (with `act`) before the box regressor; 0: none.
    act: the hidden layer's activation.  dtype: compute dtype, also the backbone's.
    bn_axis_name: pmap's batch-norm axis, for the backbone.
  Input (B, H, W, C) -> {'logits': (B, num_classes), 'box': (B, 4) (ymin, xmin, ymax, xmax) in
  [0, 1] with min <= max}, both float32.
  """
  num_classes: int = 4
  backbone: str = 'conv_stack'
  backbone_args: Mapping[str, Any] = FrozenDict()
  box_hidden: int = 0
  act: str = 'relu'
  dtype: Any = None
  bn_axis_name: str | None = None

  def __post_init__(self):
    check_num_classes(self.num_classes)
    hidden = self.box_hidden
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
      raise ValueError(f'box_hidden must be an int >= 0 (0: no hidden layer), got {hidden!r}')
    activation(self.act)
    self.backbone_args = freeze_args(self.backbone_args, 'localizer')
    check_backbone('localizer', self.backbone, self.backbone_args,
                   'num_classes=0 (pooled features)')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Images (B, H, W, C) -> {'logits': (B, num_classes), 'box': (B, 4)}."""
    features = build_backbone(self.backbone, self.backbone_args, dtype=self.dtype,
                              bn_axis_name=self.bn_axis_name, num_classes=0)(x, train)
    if features.ndim != 2 or features.shape[-1] == 0:
      raise ValueError(f'localizer: backbone {self.backbone!r} with num_classes=0 returned shape '
                       f'{features.shape}, not pooled features (B, D)')
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='class_head')(features)
    h = features
    if self.box_hidden:
      h = activation(self.act)(nn.Dense(self.box_hidden, dtype=self.dtype, name='box_hidden')(h))
    # The box arithmetic in float32 whatever the compute dtype: bfloat16 has 8 bits of mantissa.
    raw = as_logits(nn.Dense(4, dtype=self.dtype, name='box_head')(h))
    self.sow('intermediates', 'box_raw', raw)
    return {'logits': as_logits(logits), 'box': box_from_centre_size(raw)}
