"""Faster R-CNN (Ren et al. 2015): a two-stage detector, torchvision's (models.detection.
faster_rcnn) with static shapes, jittable end to end, on one feature map of a registered backbone.

Conventions: boxes are (ymin, xmin, ymax, xmax), y first, as in cnnlab.ops; the model's inputs
and outputs are in image FRACTIONS [0, 1], its inner arithmetic in pixels (float32 whatever the
compute dtype). Deltas are (dy, dx, dh, dw) (cnnlab.ops.coding). Classes: the dataset's labels
are 0..K-1; the box head's class k + 1 is label k and its class 0 is the background.

The stages: the backbone's map at `feature_level` (stride s) -> the RPN head (3x3 conv + ReLU,
then a 1x1 objectness logit and a 1x1 delta per anchor) over the anchors of
cnnlab.ops.generate_anchors (`anchor_sizes` x `aspect_ratios` per location) -> proposals: the
deltas decoded on the anchors, clipped to the image, the `rpn_pre_nms_top_n_*` best by objectness,
boxes under `rpn_min_size` dropped, NMS at `rpn_nms_threshold`, the first `rpn_post_nms_top_n_*`
kept (padded, with a validity mask; no gradient flows through them, as torchvision detaches
them) -> RoIAlign (roi_output_size^2 bins, sampling_ratio roi_sampling_ratio, aligned=False as
torchvision's MultiScaleRoIAlign, spatial scale 1/s) -> the box head (flatten, two Dense + ReLU of
`representation_size`, torchvision's TwoMLPHead) -> K + 1 class logits and per-class deltas
(box coder weights (10, 10, 5, 5)).

Outputs, all float arrays float32:
  train=False: {'boxes' (B, D, 4) fractions in [0, 1], 'scores' (B, D), 'labels' (B, D) int32 in
    [0, K), 'num_detections' (B,) int32}, D = detections_per_image: torchvision's
    postprocess_detections (softmax; each class's decoded box clipped; background dropped; score
    > box_score_threshold; boxes under 1e-2 px dropped; NMS per class at box_nms_threshold; the
    best D), sorted by decreasing score; after num_detections, boxes, scores and labels are 0.
  train=True (needs `targets` and a 'sample' rng: the anchors and RoIs are sampled at random):
    'rpn_logits' (B, A) every anchor's objectness logit; 'rpn_deltas' (B, A, 4);
    'rpn_labels' (B, A) int32: 1 sampled positive, 0 sampled negative, -1 not sampled;
    'rpn_targets' (B, A, 4): encode(matched ground truth, anchor), weights 1, 0 off positives;
    'roi_logits' (B, R, K + 1); 'roi_deltas' (B, R, 4): each RoI's deltas for its target class
      (class 0's for background and unsampled RoIs), R = box_batch_size_per_image;
    'roi_labels' (B, R) int32: 0 background, k + 1 class k, -1 not sampled (padding);
    'roi_targets' (B, R, 4): encode(matched ground truth, RoI), weights (10, 10, 5, 5), 0 off the
      foreground.
  The losses that go with them (torchvision's, computed by cnnlab.tasks' detection task):
    RPN  binary cross-entropy with logits over the sampled anchors (rpn_labels >= 0), mean;
         + smooth L1 (beta 1/9) of rpn_deltas - rpn_targets over the positives, summed, / the
         number of sampled anchors.
    RoI  cross-entropy of roi_logits over the sampled RoIs (roi_labels >= 0), mean;
         + smooth L1 (beta 1/9) of roi_deltas - roi_targets over the foreground (roi_labels > 0),
         summed, / the number of sampled RoIs.
  The proposals (B, P, 4) (fractions, zeros after the valid ones) are sown into 'intermediates'.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from cnnlab.layers import as_logits, relu
from cnnlab.models.backbone import build_backbone, check_backbone, freeze_args
from cnnlab.models.detection_targets import roi_targets, rpn_targets
from cnnlab.models.registry import check_num_classes, register
from cnnlab.ops import (batched_nms, clip_boxes, decode, generate_anchors, min_size_mask, nms,
                        roi_align)

# The backbone arguments the detector starts from (over cnnlab.models.backbone's defaults, under
# its `backbone_args`): conv_stack's three stages of 32, 64, 128 filters end at stride 8, an 8x8
# map on 64x64 images (feature_level=-1).
DETECTION_BACKBONE_DEFAULTS: dict[str, dict[str, Any]] = {
    'conv_stack': {'filters': (32, 64, 128)},
}
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # torchvision's RoIHeads box coder, (wy, wx, wh, ww)
DETECTION_MIN_SIZE = 1e-2  # torchvision's postprocess_detections drops boxes smaller (pixels)


def propose(anchors: jax.Array, logits: jax.Array, deltas: jax.Array, image_size: tuple[int, int],
            *, pre_nms_top_n: int, post_nms_top_n: int, nms_threshold: float, min_size: float
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One image's proposals (RegionProposalNetwork.filter_proposals, one level): anchors (A, 4),
  objectness logits (A,) and deltas (A, 4) -> (boxes (P, 4) pixels, scores (P,) sigmoid
  objectness, valid (P,) bool), P = post_nms_top_n, in decreasing score; the invalid ones
  (fewer boxes survived) have score 0 and some valid-looking box: mask them."""
  logits, deltas = logits.astype(jnp.float32), deltas.astype(jnp.float32)
  top_logits, top = jax.lax.top_k(logits, min(pre_nms_top_n, logits.shape[0]))
  boxes = clip_boxes(decode(deltas[top], anchors[top]), *image_size)
  scores = jax.nn.sigmoid(top_logits)
  keep, valid = nms(boxes, scores, nms_threshold, post_nms_top_n,
                    valid=min_size_mask(boxes, min_size))
  return boxes[keep], jnp.where(valid, scores[keep], 0), valid


def postprocess(class_logits: jax.Array, box_deltas: jax.Array, proposals: jax.Array,
                proposal_valid: jax.Array, image_size: tuple[int, int], *,
                score_threshold: float = 0.05, nms_threshold: float = 0.5,
                detections_per_image: int = 100, weights: Sequence[float] = BOX_WEIGHTS
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One image's detections, as torchvision's RoIHeads.postprocess_detections: class logits
  (P, K + 1), per-class deltas (P, K + 1, 4), proposals (P, 4) pixels (`proposal_valid` (P,)
  False for padding) -> (boxes (D, 4) pixels, scores (D,), labels (D,) int32 in 1..K, valid (D,)),
  D = detections_per_image, in decreasing score, the invalid ones after the valid ones, 0."""
  num_classes = class_logits.shape[-1] - 1
  scores = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, 1:]
  boxes = decode(box_deltas[:, 1:].astype(jnp.float32), proposals[:, None], weights)
  boxes = clip_boxes(boxes, *image_size).reshape(-1, 4)
  labels = jnp.broadcast_to(jnp.arange(1, num_classes + 1, dtype=jnp.int32), scores.shape)
  scores, labels = scores.reshape(-1), labels.reshape(-1)
  valid = (jnp.repeat(proposal_valid, num_classes) & (scores > score_threshold)
           & min_size_mask(boxes, DETECTION_MIN_SIZE))
  keep, kept = batched_nms(boxes, scores, labels, nms_threshold, detections_per_image, valid)
  zero = jnp.zeros((), jnp.float32)
  return (jnp.where(kept[:, None], boxes[keep], zero), jnp.where(kept, scores[keep], zero),
          jnp.where(kept, labels[keep], 0), kept)


class RPNHead(nn.Module):
  """torchvision's RPNHead on one map: 3x3 conv + ReLU, then 1x1 convs to `num_anchors`
  objectness logits and 4 * num_anchors deltas per location; weights N(0, 0.01), biases 0.
  (B, h, w, C) -> (logits (B, h * w * A), deltas (B, h * w * A, 4)), float32, in the anchors'
  order (location-major, a location's anchors together)."""
  num_anchors: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    conv = partial(nn.Conv, padding='SAME', dtype=self.dtype,
                   kernel_init=nn.initializers.normal(0.01))
    x = relu(conv(x.shape[-1], (3, 3), name='conv')(x))
    logits = conv(self.num_anchors, (1, 1), name='cls_logits')(x)
    deltas = conv(4 * self.num_anchors, (1, 1), name='bbox_pred')(x)
    batch = x.shape[0]
    return as_logits(logits).reshape(batch, -1), as_logits(deltas).reshape(batch, -1, 4)


class BoxHead(nn.Module):
  """torchvision's TwoMLPHead + FastRCNNPredictor: pooled RoIs (B, R, h, w, C) -> (class logits
  (B, R, K + 1), per-class deltas (B, R, K + 1, 4)), float32. The predictors start as Detectron's
  (weights N(0, 0.01) for the classes, N(0, 0.001) for the deltas)."""
  num_classes: int
  representation_size: int
  dtype: Any = None

  @nn.compact
  def __call__(self, rois: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = rois.reshape(*rois.shape[:2], -1)
    x = relu(nn.Dense(self.representation_size, dtype=self.dtype, name='fc6')(x))
    x = relu(nn.Dense(self.representation_size, dtype=self.dtype, name='fc7')(x))
    logits = nn.Dense(self.num_classes + 1, dtype=self.dtype, name='cls_score',
                      kernel_init=nn.initializers.normal(0.01))(x)
    deltas = nn.Dense(4 * (self.num_classes + 1), dtype=self.dtype, name='bbox_pred',
                      kernel_init=nn.initializers.normal(0.001))(x)
    return as_logits(logits), as_logits(deltas).reshape(*x.shape[:2], self.num_classes + 1, 4)


def _check_int(name: str, value, least: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < least:
    raise ValueError(f'{name} must be an int >= {least}, got {value!r}')


def _check_fraction(name: str, value, low_open: bool = False) -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      0 < value <= 1 if low_open else 0 <= value <= 1)
  if not ok:
    raise ValueError(f'{name} must be a number in {"(0, 1]" if low_open else "[0, 1]"}, '
                     f'got {value!r}')


def _check_positives(name: str, values) -> None:
  if (not isinstance(values, (tuple, list)) or not values
      or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                 for v in values)):
    raise ValueError(f'{name} must be a non-empty sequence of positive numbers, got {values!r}')


@register('faster_rcnn', input_shape=(64, 64, 3), num_classes=4, task='detection')
class FasterRCNN(nn.Module):
  """Faster R-CNN on one feature map of a backbone (see the module docstring for the stages,
  the outputs and their losses).

  Called as `model.apply(variables, images, train, targets=...)` with images (B, H, W, C) and,
  when train=True, `targets` = {'boxes': (B, N, 4) float fractions (ymin, xmin, ymax, xmax),
  'labels': (B, N) int in [0, K), 'num_objects': (B,) int: the first num_objects are the objects,
  the rest padding} and rngs={'sample': key, ...}.

  Attributes (defaults for 64x64 images with objects of 10-22 px):
    num_classes: K object classes (the background is extra).
    backbone, backbone_args: a registered model following timm's conventions, built with
      features_only=True as the child 'backbone' (see cnnlab.models.backbone); its arguments
      over DETECTION_BACKBONE_DEFAULTS (conv_stack: filters (32, 64, 128), stride 8 last).
    feature_level: the backbone stage whose map is used (an index, negative from the end).
    anchor_sizes (pixels), aspect_ratios (height / width): the anchors at each location.
    rpn_pre_nms_top_n_train / _test: proposals kept by objectness before NMS.
    rpn_post_nms_top_n_train / _test: proposals kept after NMS (P).
    rpn_nms_threshold: the proposals' NMS IoU.  rpn_min_size: smaller proposals are dropped (px).
    rpn_fg_iou_threshold / rpn_bg_iou_threshold: anchor IoU with an object for positive /
      below which negative (between: ignored; each object's best anchors are positive too).
    rpn_batch_size_per_image, rpn_positive_fraction: anchors sampled for the RPN's loss.
    box_fg_iou_threshold / box_bg_iou_threshold: RoI IoU for foreground / below which background.
    box_batch_size_per_image (R), box_positive_fraction: RoIs sampled for the box head's loss.
    roi_output_size, roi_sampling_ratio: RoIAlign's bins per side and samples per bin side.
    representation_size: the box head's two hidden layers' width.
    box_score_threshold, box_nms_threshold, detections_per_image (D): the detections.
    dtype: compute dtype (box arithmetic is float32), also the backbone's.
    bn_axis_name: pmap's batch-norm axis, for the backbone.
  """
  num_classes: int = 4
  backbone: str = 'conv_stack'
  backbone_args: Mapping[str, Any] = FrozenDict()
  feature_level: int = -1
  anchor_sizes: Sequence[float] = (8.0, 16.0, 32.0)
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
  rpn_pre_nms_top_n_train: int = 1000
  rpn_pre_nms_top_n_test: int = 500
  rpn_post_nms_top_n_train: int = 128
  rpn_post_nms_top_n_test: int = 64
  rpn_nms_threshold: float = 0.7
  rpn_min_size: float = 1e-3
  rpn_fg_iou_threshold: float = 0.7
  rpn_bg_iou_threshold: float = 0.3
  rpn_batch_size_per_image: int = 256
  rpn_positive_fraction: float = 0.5
  box_fg_iou_threshold: float = 0.5
  box_bg_iou_threshold: float = 0.5
  box_batch_size_per_image: int = 64
  box_positive_fraction: float = 0.25
  roi_output_size: int = 7
  roi_sampling_ratio: int = 2
  representation_size: int = 128
  box_score_threshold: float = 0.05
  box_nms_threshold: float = 0.5
  detections_per_image: int = 20
  dtype: Any = None
  bn_axis_name: str | None = None

  def __post_init__(self):
    check_num_classes(self.num_classes)
    self.backbone_args = freeze_args(self.backbone_args, 'faster_rcnn')
    check_backbone('faster_rcnn', self.backbone, self.backbone_args, 'features_only=True')
    if isinstance(self.feature_level, bool) or not isinstance(self.feature_level, int):
      raise ValueError(f'feature_level must be an int (a backbone stage index), '
                       f'got {self.feature_level!r}')
    _check_positives('anchor_sizes', self.anchor_sizes)
    _check_positives('aspect_ratios', self.aspect_ratios)
    self.anchor_sizes, self.aspect_ratios = tuple(self.anchor_sizes), tuple(self.aspect_ratios)
    for name in ('rpn_pre_nms_top_n_train', 'rpn_pre_nms_top_n_test', 'rpn_post_nms_top_n_train',
                 'rpn_post_nms_top_n_test', 'rpn_batch_size_per_image',
                 'box_batch_size_per_image', 'roi_output_size', 'roi_sampling_ratio',
                 'representation_size', 'detections_per_image'):
      _check_int(name, getattr(self, name))
    for name in ('rpn_nms_threshold', 'rpn_fg_iou_threshold', 'rpn_bg_iou_threshold',
                 'box_fg_iou_threshold', 'box_bg_iou_threshold', 'box_score_threshold',
                 'box_nms_threshold'):
      _check_fraction(name, getattr(self, name))
    for name in ('rpn_positive_fraction', 'box_positive_fraction'):
      _check_fraction(name, getattr(self, name), low_open=True)
    for stage in ('rpn', 'box'):
      fg = getattr(self, f'{stage}_fg_iou_threshold')
      bg = getattr(self, f'{stage}_bg_iou_threshold')
      if bg > fg:
        raise ValueError(f'{stage}_bg_iou_threshold={bg} must be <= {stage}_fg_iou_threshold={fg}')
    if not isinstance(self.rpn_min_size, (int, float)) or not self.rpn_min_size >= 0:
      raise ValueError(f'rpn_min_size must be a number >= 0 (pixels), got {self.rpn_min_size!r}')
    if self.box_batch_size_per_image > self.rpn_post_nms_top_n_train:
      raise ValueError(f'box_batch_size_per_image={self.box_batch_size_per_image} must be <= '
                       f'rpn_post_nms_top_n_train={self.rpn_post_nms_top_n_train} (the RoIs are '
                       'drawn from the proposals)')
    super().__post_init__()

  @property
  def num_anchors(self) -> int:
    """Anchors per location (A of the RPN head)."""
    return len(self.anchor_sizes) * len(self.aspect_ratios)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False,
               targets: Mapping[str, jax.Array] | None = None) -> dict[str, jax.Array]:
    """Images (B, H, W, C) -> detections (train=False) or the training outputs (train=True);
    see the module docstring."""
    if images.ndim != 4:
      raise ValueError(f'faster_rcnn: images must be (B, H, W, C), got shape {images.shape}')
    batch, height, width = images.shape[:3]
    if train:
      gt_boxes, gt_labels, gt_valid = self._ground_truth(targets, batch, height, width)
      if not self.has_rng('sample'):
        raise ValueError("faster_rcnn: train=True samples anchors and RoIs at random: pass a "
                         "'sample' rng, model.apply(..., rngs={'sample': key, ...})")
    features, stride = self._features(images, train)
    anchors = jnp.asarray(generate_anchors((height, width), [features.shape[1:3]],
                                           [self.anchor_sizes], self.aspect_ratios))
    rpn_logits, rpn_deltas = RPNHead(self.num_anchors, dtype=self.dtype,
                                     name='rpn_head')(features)
    pixels = jnp.asarray([height, width, height, width], jnp.float32)
    proposals, scores, valid = jax.vmap(partial(
        propose, image_size=(height, width),
        pre_nms_top_n=self.rpn_pre_nms_top_n_train if train else self.rpn_pre_nms_top_n_test,
        post_nms_top_n=self.rpn_post_nms_top_n_train if train else self.rpn_post_nms_top_n_test,
        nms_threshold=self.rpn_nms_threshold, min_size=self.rpn_min_size), in_axes=(None, 0, 0))(
            anchors, jax.lax.stop_gradient(rpn_logits), jax.lax.stop_gradient(rpn_deltas))
    self.sow('intermediates', 'proposals', jnp.where(valid[..., None], proposals / pixels, 0))
    box_head = BoxHead(self.num_classes, self.representation_size, dtype=self.dtype,
                       name='box_head')

    if not train:
      class_logits, box_deltas = box_head(self._pool(features, proposals, stride))
      boxes, scores, labels, kept = jax.vmap(partial(
          postprocess, image_size=(height, width), score_threshold=self.box_score_threshold,
          nms_threshold=self.box_nms_threshold, detections_per_image=self.detections_per_image))(
              class_logits, box_deltas, proposals, valid)
      return {'boxes': jnp.clip(boxes / pixels, 0, 1), 'scores': scores,
              'labels': jnp.where(kept, labels - 1, 0).astype(jnp.int32),
              'num_detections': jnp.sum(kept, axis=1, dtype=jnp.int32)}

    keys = jax.random.split(self.make_rng('sample'), (2, batch))
    rpn_labels, rpn_target_deltas = jax.vmap(partial(
        rpn_targets, fg_iou_threshold=self.rpn_fg_iou_threshold,
        bg_iou_threshold=self.rpn_bg_iou_threshold, batch_size=self.rpn_batch_size_per_image,
        positive_fraction=self.rpn_positive_fraction), in_axes=(0, None, 0, 0))(
            keys[0], anchors, gt_boxes, gt_valid)
    rois, roi_labels, roi_target_deltas = jax.vmap(partial(
        roi_targets, batch_size=self.box_batch_size_per_image,
        positive_fraction=self.box_positive_fraction, fg_iou_threshold=self.box_fg_iou_threshold,
        bg_iou_threshold=self.box_bg_iou_threshold, weights=BOX_WEIGHTS))(
            keys[1], proposals, valid, gt_boxes, gt_labels, gt_valid)
    class_logits, box_deltas = box_head(self._pool(features, rois, stride))
    target_class = jnp.maximum(roi_labels, 0)[:, :, None, None]
    roi_deltas = jnp.take_along_axis(box_deltas, target_class, axis=2)[:, :, 0]
    return {'rpn_logits': rpn_logits, 'rpn_deltas': rpn_deltas, 'rpn_labels': rpn_labels,
            'rpn_targets': rpn_target_deltas, 'roi_logits': class_logits, 'roi_deltas': roi_deltas,
            'roi_labels': roi_labels, 'roi_targets': roi_target_deltas}

  def _features(self, images: jax.Array, train: bool) -> tuple[jax.Array, int]:
    """The backbone's map at feature_level (B, h, w, C) and its stride."""
    args = {**DETECTION_BACKBONE_DEFAULTS.get(self.backbone, {}), **self.backbone_args}
    backbone = build_backbone(self.backbone, args, dtype=self.dtype,
                              bn_axis_name=self.bn_axis_name, features_only=True)
    reductions = list(backbone.feature_reductions())
    if not -len(reductions) <= self.feature_level < len(reductions):
      raise ValueError(f'faster_rcnn: feature_level={self.feature_level} but backbone '
                       f'{self.backbone!r} has {len(reductions)} stages (strides {reductions})')
    return backbone(images, train)[self.feature_level], reductions[self.feature_level]

  def _pool(self, features: jax.Array, boxes: jax.Array, stride: int) -> jax.Array:
    """RoIAlign of boxes (B, K, 4) pixels on the map of `stride`: (B, K, out, out, C)."""
    return roi_align(features, boxes, self.roi_output_size, 1.0 / stride,
                     self.roi_sampling_ratio, aligned=False)

  def _ground_truth(self, targets, batch: int, height: int, width: int
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`targets` checked: (boxes (B, N, 4) float32 pixels, labels (B, N) int32, valid (B, N))."""
    if targets is None:
      raise ValueError("faster_rcnn: train=True needs targets={'boxes': (B, N, 4) fractions, "
                       "'labels': (B, N), 'num_objects': (B,)}: the anchors and RoIs are "
                       'matched to the ground truth inside the model')
    missing = [k for k in ('boxes', 'labels', 'num_objects') if k not in targets]
    if missing:
      raise ValueError(f'faster_rcnn: targets lack {missing}; they have {sorted(targets)}')
    boxes, labels, count = targets['boxes'], targets['labels'], targets['num_objects']
    n = boxes.shape[1] if boxes.ndim == 3 else -1
    if (boxes.shape != (batch, n, 4) or labels.shape != (batch, n)
        or count.shape != (batch,)):
      raise ValueError(f"faster_rcnn: targets must be 'boxes' (B, N, 4), 'labels' (B, N) and "
                       f"'num_objects' (B,) with B = {batch}, got {boxes.shape}, {labels.shape} "
                       f'and {count.shape}')
    valid = jnp.arange(n)[None, :] < count[:, None]
    pixels = jnp.asarray([height, width, height, width], jnp.float32)
    boxes = jnp.where(valid[..., None], boxes.astype(jnp.float32) * pixels, 0)
    return boxes, jnp.where(valid, labels, 0).astype(jnp.int32), valid


__all__ = ['FasterRCNN', 'RPNHead', 'BoxHead', 'propose', 'postprocess',
           'DETECTION_BACKBONE_DEFAULTS', 'BOX_WEIGHTS']
