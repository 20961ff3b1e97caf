"""Fully convolutional networks for segmentation (Long, Shelhamer & Darrell 2015): FCN-32s, -16s
and -8s on any backbone that returns per-stage feature maps."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
from flax.core import FrozenDict

from cnnlab.layers import ConvBlock, as_logits, check_choice, he_normal_fan_out
from cnnlab.layers.upsample import UpBlock, bilinear_kernel_init, upsampling_geometry
from cnnlab.models.backbone import build_backbone, check_backbone, freeze_args
from cnnlab.models.registry import check_num_classes, register

# How many of the backbone's last stages each variant scores and fuses; on a backbone whose last
# three stages have strides 8, 16 and 32 the name is the stride of the finest prediction.
VARIANTS = {'32s': 1, '16s': 2, '8s': 3}


@register('fcn', input_shape=(64, 64, 3), num_classes=5, task='segmentation')
class FCN(nn.Module):
  """FCN-32s / 16s / 8s: per-pixel logits from a backbone's last stages.

  A 1x1 conv 'score_stage{i}' maps stage i's features to class scores. The coarsest scores are
  upsampled by a transposed convolution 'up_stage{i}' (kernel 2f, stride f for a stride ratio f,
  its kernel initialised to bilinear interpolation) to the next finer scored stage and added to
  its scores; the finest sum is upsampled to the input. As in the paper, the score layers of the
  earlier stages start at zero (the net starts as FCN-32s) and `learn_upsampling=False` keeps the
  final upsampling fixed at bilinear interpolation (a constant, not a parameter); the 2x ones learn.

  Alignment: score cell n of a stride-f map is placed at input pixels [n f, (n + 1) f), where
  a pooling backbone (conv_stack) puts it. Where the upsampled map is larger than the finer map
  (SAME-padded strided convolutions round up) it is cropped at the end; where smaller (pooling
  rounds down) the transposed convolution's output padding extends it.

  Attributes:
    num_classes: classes per pixel (segmentation of `shapes`: its classes + 1 background).
    backbone: a registered model following timm's conventions (conv_stack, resnet18, ...; see
      cnnlab.models.backbone), built with features_only=True as the child 'backbone'.
    backbone_args: the backbone's own arguments, over BACKBONE_DEFAULTS (conv_stack: five
      stages of 32, 64, 128, 128, 256 filters, strides 2 to 32).
    variant: '32s' | '16s' | '8s': score the last 1, 2 or 3 stages.
    learn_upsampling: whether the final upsampling is a learnt parameter.
    dtype: compute dtype, also the backbone's.  bn_axis_name: pmap's batch-norm axis (backbone).
  Input (B, H, W, C) -> logits (B, H, W, num_classes), float32.
  """
  num_classes: int = 5
  backbone: str = 'conv_stack'
  backbone_args: Mapping[str, Any] = FrozenDict()
  variant: str = '8s'
  learn_upsampling: bool = True
  dtype: Any = None
  bn_axis_name: str | None = None

  def __post_init__(self):
    check_num_classes(self.num_classes)
    check_choice('variant', self.variant, tuple(VARIANTS))
    self.backbone_args = freeze_args(self.backbone_args, 'fcn')
    check_backbone('fcn', self.backbone, self.backbone_args, 'features_only=True')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Images (B, H, W, C) -> per-pixel logits (B, H, W, num_classes)."""
    backbone = build_backbone(self.backbone, self.backbone_args, dtype=self.dtype,
                              bn_axis_name=self.bn_axis_name, features_only=True)
    reductions = list(backbone.feature_reductions())
    used = VARIANTS[self.variant]
    if len(reductions) < used:
      raise ValueError(f"fcn: variant {self.variant!r} scores the last {used} stages, but backbone "
                       f'{self.backbone!r} has {len(reductions)}')
    stages = range(len(reductions) - used + 1, len(reductions) + 1)  # the backbone's, from 1
    maps, reductions = backbone(x, train)[-used:], reductions[-used:]  # [(B, h_i, w_i, C_i)]

    score = None
    for k in reversed(range(used)):  # coarsest first
      zero = k < used - 1  # a skip stage's scores start at zero
      s = ConvBlock(self.num_classes, 1, norm='none', act='none', dtype=self.dtype,
                    kernel_init=nn.initializers.zeros if zero else he_normal_fan_out,
                    name=f'score_stage{stages[k]}')(maps[k], train)
      if score is not None:
        factor = reductions[k + 1] // reductions[k]
        if factor * reductions[k] != reductions[k + 1]:
          raise ValueError(f'fcn: backbone {self.backbone!r} stage strides {tuple(reductions)} are '
                           'not multiples of one another')
        score = s + self._upsample(score, s.shape[1:3], factor, f'up_stage{stages[k + 1]}', True)
      else:
        score = s
      self.sow('intermediates', f'fused_stage{stages[k]}', score)
    return as_logits(self._upsample(score, x.shape[1:3], reductions[0], f'up_stage{stages[0]}',
                                    self.learn_upsampling))

  def _upsample(self, score: jax.Array, size, factor: int, name: str, learnable: bool) -> jax.Array:
    """Scores (B, h, w, K) -> (B, *size, K): bilinear-initialised transposed convolution by
    `factor`, extended by output padding or cropped at the end to `size`."""
    kernel, padding = upsampling_geometry(factor)
    extra = [t - n * factor for t, n in zip(size, score.shape[1:3])]
    if max(extra) >= factor:
      raise ValueError(f'fcn: {name} upsamples a {tuple(score.shape[1:3])} map by {factor}, which '
                       f'cannot cover {tuple(size)}: backbone {self.backbone!r} shrinks the input '
                       'more than its strides say (VALID padding?)')
    y = UpBlock(self.num_classes, kernel, factor, padding,
                output_padding=tuple(max(e, 0) for e in extra), norm='none', act='none',
                use_bias=False, kernel_init=bilinear_kernel_init, learnable=learnable,
                dtype=self.dtype, name=name)(score)
    return y[:, :size[0], :size[1]]
