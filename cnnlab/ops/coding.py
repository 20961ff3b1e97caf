"""Box regression targets as Faster R-CNN codes them (torchvision.models.detection._utils.BoxCoder).

Boxes are (ymin, xmin, ymax, xmax) and deltas (dy, dx, dh, dw), both y first; `weights` are in
the deltas' order, (wy, wx, wh, ww): torchvision's (wx, wy, ww, wh) = (10, 10, 5, 5) of the RoI
heads and (1, 1, 1, 1) of the RPN read the same either way. A box's height is ymax - ymin (no
+1) and its centre ymin + height / 2, as in torchvision. Every function takes any leading shape
that broadcasts: (..., 4) with (..., 4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# torchvision's bbox_xform_clip: exp(dh) is clamped to at most 1000 / 16 times the anchor's size.
DEFAULT_CLIP = math.log(1000.0 / 16)


def _check_boxes(name: str, boxes: jax.Array) -> None:
  if boxes.ndim < 1 or boxes.shape[-1] != 4:
    raise ValueError(f'{name} must have shape (..., 4), got {boxes.shape}')


def _check_weights(weights: Sequence[float]) -> tuple[float, float, float, float]:
  weights = tuple(float(w) for w in weights)
  if len(weights) != 4:
    raise ValueError(f'weights must be 4 numbers (wy, wx, wh, ww), got {weights}')
  return weights  # type: ignore[return-value]


def _float(x: jax.Array) -> jax.Array:
  return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _centre_size(boxes: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(ctr_y, ctr_x, height, width), computed as torchvision computes them."""
  heights = boxes[..., 2] - boxes[..., 0]
  widths = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * heights, boxes[..., 1] + 0.5 * widths, heights, widths


def encode(reference_boxes: jax.Array, proposals: jax.Array,
           weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> jax.Array:
  """The deltas (dy, dx, dh, dw) that take `proposals` (anchors, or the RPN's proposals) to
  `reference_boxes` (their matched ground truth): (..., 4), (..., 4) -> (..., 4), as
  torchvision's BoxCoder(weights).encode_single(reference_boxes, proposals). A proposal of zero
  height or width gives inf or NaN, as there."""
  reference_boxes, proposals = _float(jnp.asarray(reference_boxes)), _float(jnp.asarray(proposals))
  _check_boxes('reference_boxes', reference_boxes)
  _check_boxes('proposals', proposals)
  wy, wx, wh, ww = _check_weights(weights)
  ex_cy, ex_cx, ex_h, ex_w = _centre_size(proposals)
  gt_cy, gt_cx, gt_h, gt_w = _centre_size(reference_boxes)
  return jnp.stack([wy * (gt_cy - ex_cy) / ex_h, wx * (gt_cx - ex_cx) / ex_w,
                    wh * jnp.log(gt_h / ex_h), ww * jnp.log(gt_w / ex_w)], axis=-1)


def decode(deltas: jax.Array, anchors: jax.Array,
           weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
           clip: float = DEFAULT_CLIP) -> jax.Array:
  """The boxes that `deltas` (dy, dx, dh, dw) make of `anchors`: (..., 4), (..., 4) -> (..., 4)
  (broadcast: class-specific deltas (N, K, 4) take anchors[:, None]), as torchvision's
  BoxCoder(weights).decode_single. dh / wh and dw / ww are clamped to at most `clip` before
  exp, so that no box grows past exp(clip) times its anchor."""
  deltas = _float(jnp.asarray(deltas))
  _check_boxes('deltas', deltas)
  anchors = jnp.asarray(anchors)
  _check_boxes('anchors', anchors)
  anchors = anchors.astype(deltas.dtype)
  wy, wx, wh, ww = _check_weights(weights)
  ctr_y, ctr_x, heights, widths = _centre_size(anchors)
  dy, dx = deltas[..., 0] / wy, deltas[..., 1] / wx
  dh = jnp.minimum(deltas[..., 2] / wh, clip)
  dw = jnp.minimum(deltas[..., 3] / ww, clip)
  pred_cy, pred_cx = dy * heights + ctr_y, dx * widths + ctr_x
  half_h, half_w = 0.5 * (jnp.exp(dh) * heights), 0.5 * (jnp.exp(dw) * widths)
  return jnp.stack([pred_cy - half_h, pred_cx - half_w, pred_cy + half_h, pred_cx + half_w],
                   axis=-1)


def clip_boxes(boxes: jax.Array, height, width) -> jax.Array:
  """Boxes (..., 4) clamped into the image [0, height] x [0, width]
  (torchvision.ops.clip_boxes_to_image). `height` and `width` may be arrays that broadcast
  against boxes[..., 0], e.g. (B, 1) for a batch of images of different sizes."""
  boxes = jnp.asarray(boxes)
  _check_boxes('boxes', boxes)
  height = jnp.asarray(height, boxes.dtype)
  width = jnp.asarray(width, boxes.dtype)
  y = jnp.clip(boxes[..., 0::2], 0, height[..., None])
  x = jnp.clip(boxes[..., 1::2], 0, width[..., None])
  return jnp.stack([y[..., 0], x[..., 0], y[..., 1], x[..., 1]], axis=-1)


def min_size_mask(boxes: jax.Array, min_size: float) -> jax.Array:
  """(..., 4) -> (...) bool: True where the box is at least `min_size` high and wide: the mask
  form of torchvision.ops.remove_small_boxes, for static shapes (pass it as nms's `valid`)."""
  boxes = jnp.asarray(boxes)
  _check_boxes('boxes', boxes)
  return ((boxes[..., 2] - boxes[..., 0] >= min_size) &
          (boxes[..., 3] - boxes[..., 1] >= min_size))


__all__ = ['DEFAULT_CLIP', 'encode', 'decode', 'clip_boxes', 'min_size_mask']
