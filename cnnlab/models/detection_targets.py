"""Training targets of a two-stage detector (Faster R-CNN), per image, with static shapes: the
matching and sampling of torchvision.models.detection (_utils.Matcher,
_utils.BalancedPositiveNegativeSampler, rpn.RegionProposalNetwork.assign_targets_to_anchors,
roi_heads.RoIHeads.select_training_samples), as jittable functions of one image; vmap them over
a batch.

Boxes are (ymin, xmin, ymax, xmax) in pixels; deltas (dy, dx, dh, dw) (cnnlab.ops.coding). The
ground truth of an image is padded: (N, 4) boxes, (N,) labels and an (N,) `gt_valid` mask; a
padded box takes part in nothing (an image whose boxes are all padding has no object).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from cnnlab.ops import box_iou, encode

# Matcher's codes for a box matched to no ground truth.
BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def match(quality: jax.Array, gt_valid: jax.Array, high_threshold: float, low_threshold: float,
          allow_low_quality_matches: bool = False) -> jax.Array:
  """torchvision's Matcher(high_threshold, low_threshold, allow_low_quality_matches) on a
  quality matrix (N ground truths, M boxes), usually their IoU: (M,) int32, for each box the index
  of its best ground truth if that quality is >= high_threshold, BELOW_LOW_THRESHOLD (-1) if it
  is < low_threshold, else BETWEEN_THRESHOLDS (-2).

  With allow_low_quality_matches, every box whose quality with some ground truth equals that
  ground truth's best quality keeps its best match whatever the thresholds (so that every object
  has a box; as torchvision, the match restored is the box's best ground truth, not necessarily
  the one it was best for). Rows where `gt_valid` (N,) is False are ignored; with no valid row,
  every box is BELOW_LOW_THRESHOLD (torchvision's callers' rule for an image without objects).
  Ties go to the lowest index, as torch's max does.
  """
  quality = jnp.where(gt_valid[:, None], quality, jnp.asarray(-1, quality.dtype))
  best = jnp.max(quality, axis=0)
  all_matches = jnp.argmax(quality, axis=0).astype(jnp.int32)
  matches = jnp.where(best < low_threshold, BELOW_LOW_THRESHOLD,
                      jnp.where(best < high_threshold, BETWEEN_THRESHOLDS, all_matches))
  if allow_low_quality_matches:
    highest = jnp.max(quality, axis=1, keepdims=True)  # each ground truth's best quality
    restored = jnp.any((quality == highest) & gt_valid[:, None], axis=0)
    matches = jnp.where(restored, all_matches, matches)
  return jnp.where(jnp.any(gt_valid), matches, BELOW_LOW_THRESHOLD).astype(jnp.int32)


def _ranks(priority: jax.Array) -> jax.Array:
  """(M,) -> (M,) int32: each element's position in increasing order of `priority`."""
  order = jnp.argsort(priority)
  return jnp.zeros(priority.shape, jnp.int32).at[order].set(
      jnp.arange(priority.shape[0], dtype=jnp.int32))


def sample_balanced(key: jax.Array, labels: jax.Array, batch_size: int,
                    positive_fraction: float) -> tuple[jax.Array, jax.Array]:
  """torchvision's BalancedPositiveNegativeSampler(batch_size, positive_fraction) on one image's
  labels (M,) (>= 1 positive, 0 negative, -1 ignored): (positive, negative) (M,) bool masks of a
  uniformly random choice of min(#positives, int(batch_size * positive_fraction)) positives and
  min(#negatives, batch_size - that) negatives."""
  positive, negative = labels >= 1, labels == 0
  num_pos = jnp.minimum(jnp.sum(positive, dtype=jnp.int32), int(batch_size * positive_fraction))
  num_neg = jnp.minimum(jnp.sum(negative, dtype=jnp.int32), batch_size - num_pos)
  priority = jax.random.uniform(key, labels.shape)
  # Positives first in random order, then negatives: a negative's rank less #positives is its
  # rank among the negatives.
  ranks = _ranks(jnp.where(positive, priority, jnp.where(negative, priority + 2, 4)))
  first_negative = jnp.sum(positive, dtype=jnp.int32)
  return positive & (ranks < num_pos), negative & (ranks - first_negative < num_neg)


def anchor_labels(anchors: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array,
                  fg_iou_threshold: float = 0.7, bg_iou_threshold: float = 0.3
                  ) -> tuple[jax.Array, jax.Array]:
  """The RPN's labels before sampling (assign_targets_to_anchors): anchors (A, 4) against the
  ground truth (N, 4) -> (labels (A,) int32: 1 object, 0 background, -1 ignored (IoU between the
  thresholds), matched (A,) int32: the matched ground truth's index, 0 where none)."""
  matches = match(box_iou(gt_boxes, anchors), gt_valid, fg_iou_threshold, bg_iou_threshold,
                  allow_low_quality_matches=True)
  labels = jnp.where(matches >= 0, 1, jnp.where(matches == BELOW_LOW_THRESHOLD, 0, -1))
  return labels.astype(jnp.int32), jnp.maximum(matches, 0)


def rpn_targets(key: jax.Array, anchors: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array, *,
                fg_iou_threshold: float = 0.7, bg_iou_threshold: float = 0.3,
                batch_size: int = 256, positive_fraction: float = 0.5
                ) -> tuple[jax.Array, jax.Array]:
  """The RPN's sampled targets for one image: (labels (A,) int32: 1 sampled positive, 0 sampled
  negative, -1 not sampled; deltas (A, 4) float32: encode(matched ground truth, anchor) with
  weights (1, 1, 1, 1) at the positives, 0 elsewhere)."""
  labels, matched = anchor_labels(anchors, gt_boxes, gt_valid, fg_iou_threshold, bg_iou_threshold)
  positive, negative = sample_balanced(key, labels, batch_size, positive_fraction)
  sampled = jnp.where(positive, 1, jnp.where(negative, 0, -1)).astype(jnp.int32)
  return sampled, _encode_where(positive, gt_boxes[matched], anchors, (1.0, 1.0, 1.0, 1.0))


def _encode_where(mask: jax.Array, reference: jax.Array, boxes: jax.Array,
                  weights: Sequence[float]) -> jax.Array:
  """encode(reference, boxes) where `mask`, 0 elsewhere (where a padded box would give inf)."""
  boxes = boxes.astype(jnp.float32)
  unit = jnp.asarray([0.0, 0.0, 1.0, 1.0], jnp.float32)
  safe_boxes = jnp.where(mask[:, None], boxes, unit)
  safe_reference = jnp.where(mask[:, None], reference.astype(jnp.float32), safe_boxes)
  return encode(safe_reference, safe_boxes, weights)


def roi_targets(key: jax.Array, proposals: jax.Array, proposal_valid: jax.Array,
                gt_boxes: jax.Array, gt_labels: jax.Array, gt_valid: jax.Array, *,
                batch_size: int = 64, positive_fraction: float = 0.25,
                fg_iou_threshold: float = 0.5, bg_iou_threshold: float = 0.5,
                weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The box head's sampled RoIs and targets for one image (select_training_samples): the
  proposals (P, 4) (`proposal_valid` (P,) False for padding) with the ground-truth boxes appended
  (add_gt_proposals; padded ones invalid), matched at IoU >= fg_iou_threshold to a ground truth
  (labels in [0, K) become classes 1..K), background below bg_iou_threshold, sampled as
  sample_balanced does. Returns the `batch_size` RoIs (R, 4), sampled ones first:
    rois     (R, 4) float32 pixels;
    labels   (R,) int32: 0 background, k + 1 object class k, -1 not sampled (padding, when fewer
             than R RoIs could be sampled);
    deltas   (R, 4) float32: encode(matched ground truth, roi) with `weights` at the foreground,
             0 elsewhere.
  R = batch_size must be at most P + N."""
  candidates = jnp.concatenate([proposals.astype(jnp.float32), gt_boxes.astype(jnp.float32)])
  valid = jnp.concatenate([proposal_valid, gt_valid])
  if batch_size > candidates.shape[0]:
    raise ValueError(f'batch_size={batch_size} RoIs per image cannot be drawn from '
                     f'{candidates.shape[0]} candidates (proposals + ground truth)')
  matches = match(box_iou(gt_boxes.astype(jnp.float32), candidates), gt_valid, fg_iou_threshold,
                  bg_iou_threshold)
  matched = jnp.maximum(matches, 0)
  labels = jnp.where(matches >= 0, gt_labels[matched] + 1,
                     jnp.where(matches == BELOW_LOW_THRESHOLD, 0, -1))
  labels = jnp.where(valid, labels, -1).astype(jnp.int32)
  positive, negative = sample_balanced(key, labels, batch_size, positive_fraction)
  sampled = positive | negative
  chosen = jnp.argsort(~sampled, stable=True)[:batch_size]  # the sampled ones, then the others
  rois, fg = candidates[chosen], positive[chosen]
  roi_labels = jnp.where(sampled[chosen], labels[chosen], -1).astype(jnp.int32)
  deltas = _encode_where(fg, gt_boxes[matched[chosen]], rois, weights)
  return rois, roi_labels, deltas


__all__ = ['BELOW_LOW_THRESHOLD', 'BETWEEN_THRESHOLDS', 'match', 'sample_balanced',
           'anchor_labels', 'rpn_targets', 'roi_targets']
