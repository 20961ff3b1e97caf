"""Non-maximum suppression with static shapes, for jit and vmap: the boxes torchvision.ops.nms and
batched_nms keep, in the same order, padded to a fixed `max_output`.

Boxes are (ymin, xmin, ymax, xmax), (N, 4), with min <= max (torchvision's condition too: an
inverted box has a negative area in both); scores (N,). The result is
(indices (max_output,) int32, valid (max_output,) bool): the kept boxes' indices in decreasing
score order, the first `count` of them valid, the rest 0 (a safe index: mask what it gathers).
torchvision keeps all of them; here the greedy pass stops after `max_output` (the first
max_output of torchvision's answer, since it keeps in score order).

The greedy pass is torchvision's CPU kernel: visit the boxes by decreasing score, keep a box that
no kept box has suppressed, and suppress every later box whose IoU with it is > iou_threshold
(compared as torchvision compares a float32 IoU with a float64 threshold). Ties in score go to
the lower index first (a stable sort; torchvision's CPU kernel orders ties so too, in the
versions tested; its CUDA kernel need not). Boxes with valid False, or a score of -inf or NaN,
are never kept and suppress nothing.

Cost: one loop iteration per kept box (a while_loop, at most max_output), each computing the IoU
of the kept box with all N in O(N) time and memory; no (N, N) IoU matrix is stored, so N = 10^4
candidates need O(N) memory, and time O(N log N + max_output * N). Under vmap the loop runs until
the longest element of the batch is done.

The IoU is computed with the operations of torchvision's CPU kernel, in the same order, so that
the two agree bit for bit unless XLA fuses the intersection's product and the union's
subtraction into one multiply-add (it may, on any backend): then an IoU within an ulp of the
threshold can be decided differently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _areas(boxes: jax.Array) -> jax.Array:
  """torchvision's (x2 - x1) * (y2 - y1), not clamped (an inverted box has a negative area)."""
  return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _iou_row(box: jax.Array, area: jax.Array, boxes: jax.Array, areas: jax.Array) -> jax.Array:
  """IoU of `box` with each of `boxes` (N, 4), computed as torchvision's CPU kernel computes it:
  inter / (area + areas - inter)."""
  low = jnp.maximum(box[:2], boxes[:, :2])
  high = jnp.minimum(box[2:], boxes[:, 2:])
  extent = jnp.maximum(high - low, 0)
  inter = extent[:, 0] * extent[:, 1]
  return inter / (area + areas - inter)  # NaN (0 / 0) suppresses nothing, as there


def _threshold_below(iou_threshold, dtype) -> jax.Array | np.ndarray:
  """The largest value t of `dtype` <= iou_threshold: for an IoU x of that dtype, x > t exactly
  when x > iou_threshold in real numbers (torchvision compares float32 with a float64 threshold;
  rounding the threshold to nearest float32 would flip an IoU equal to the rounded value)."""
  try:
    threshold = float(iou_threshold)
  except (TypeError, jax.errors.ConcretizationTypeError):  # traced: compared as it is
    return jnp.asarray(iou_threshold, dtype)
  t = np.asarray(threshold, dtype)
  return np.nextafter(t, np.asarray(-np.inf, dtype)) if float(t) > threshold else t


def _check(boxes, scores, classes, max_output, valid):
  boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f'boxes must have shape (N, 4), got {boxes.shape}')
  if scores.shape != boxes.shape[:1]:
    raise ValueError(f'scores must have shape (N,) = {boxes.shape[:1]}, got {scores.shape}')
  if not isinstance(max_output, (int, np.integer)) or isinstance(max_output, bool) \
      or max_output < 1:
    raise ValueError(f'max_output must be a positive int (static), got {max_output!r}')
  if valid is None:
    valid = jnp.ones(scores.shape, bool)
  valid = jnp.asarray(valid)
  if valid.shape != scores.shape:
    raise ValueError(f'valid must have shape (N,) = {scores.shape}, got {valid.shape}')
  if classes is not None:
    classes = jnp.asarray(classes)
    if classes.shape != scores.shape:
      raise ValueError(f'classes must have shape (N,) = {scores.shape}, got {classes.shape}')
  return boxes, scores, classes, valid.astype(bool)


def _greedy(boxes, scores, classes, iou_threshold, max_output, valid):
  n = boxes.shape[0]
  if not jnp.issubdtype(boxes.dtype, jnp.floating):
    boxes = boxes.astype(jnp.float32)
  order = jnp.argsort(scores, descending=True, stable=True)
  boxes = boxes[order]
  areas = _areas(boxes)
  alive = (valid & (scores > -jnp.inf))[order]
  classes = None if classes is None else classes[order]
  threshold = _threshold_below(iou_threshold, boxes.dtype)
  positions = jnp.arange(n)

  def cond(state):
    count, alive, _ = state
    return (count < max_output) & jnp.any(alive)

  def body(state):
    count, alive, keep = state
    i = jnp.argmax(alive)  # the best-scoring box that is still alive
    keep = keep.at[count].set(order[i].astype(jnp.int32))
    suppressed = _iou_row(boxes[i], areas[i], boxes, areas) > threshold
    if classes is not None:
      suppressed = suppressed & (classes == classes[i])
    return count + 1, alive & ~suppressed & (positions != i), keep

  count, _, keep = jax.lax.while_loop(
      cond, body, (jnp.int32(0), alive, jnp.zeros(max_output, jnp.int32)))
  return keep, jnp.arange(max_output) < count


def nms(boxes: jax.Array, scores: jax.Array, iou_threshold: float, max_output: int,
        valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(N, 4), (N,) -> (indices (max_output,) int32, valid (max_output,) bool): the boxes that
  torchvision.ops.nms(boxes, scores, iou_threshold) keeps (IoU > iou_threshold suppresses), in
  its order, the first max_output of them. `valid` (N,) bool: candidates that may be kept (False
  for padding). `max_output` is static; `iou_threshold` a Python float (a traced one is compared
  in the boxes' dtype, as it is)."""
  boxes, scores, _, valid = _check(boxes, scores, None, max_output, valid)
  return _greedy(boxes, scores, None, iou_threshold, max_output, valid)


def batched_nms(boxes: jax.Array, scores: jax.Array, classes: jax.Array, iou_threshold: float,
                max_output: int, valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """nms class by class, as torchvision.ops.batched_nms(boxes, scores, classes, iou_threshold):
  a box suppresses only boxes of its own class (N,) (any integer labels), and the kept boxes of
  all classes come in one list in decreasing score order. Used by the RPN with the feature level
  as the class, and by the box head with the object class.

  Classes are kept apart by comparing them, not by torchvision's trick of offsetting each class's
  boxes (which it uses up to 1000 boxes on CPU): the offset coordinates round differently, so an
  IoU within an ulp of the threshold could be decided differently there. Above 1000 boxes
  torchvision runs nms class by class and then sorts by score, not stably: equal scores of
  different classes may come in another order there (here, the lower index first)."""
  boxes, scores, classes, valid = _check(boxes, scores, classes, max_output, valid)
  return _greedy(boxes, scores, classes, iou_threshold, max_output, valid)


__all__ = ['nms', 'batched_nms']
