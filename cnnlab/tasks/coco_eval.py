"""COCO-style detection evaluation in numpy, on the host: pycocotools' COCOeval (iouType='bbox')
without pycocotools, and the same numbers (tests/test_coco_eval.py holds it to COCOeval).

Conventions:
  boxes       (ymin, xmin, ymax, xmax) as in cnnlab.ops.boxes, with min <= max. In pixels with
              `image_size=None`; in image fractions with `image_size=(height, width)`, scaled to
              pixels first. Area ranges are in pixels^2 (COCO's: small < 32^2 <= medium < 96^2 <=
              large; an area on a bound is in both ranges, as in COCOeval).
  labels      ints in [0, num_classes), the classes being COCO's categories.
  crowds      none: every ground-truth object is an ordinary one (COCO's iscrowd=0); cnnlab's
              datasets have no crowd regions.
  padding     a batch is fixed-size padded arrays: the first `num_detections` / `num_objects` of an
              image are real, the rest is ignored (not even checked).

As COCOeval: the IoU is maskApi's bbIou (no +1 on widths) in float64; an image keeps, per class,
its `max_detections[-1]` best-scoring detections; each class's detections are matched greedily
from the best score down, at each IoU threshold and area range, to the unmatched true box of
highest IoU (the later one of equals), true boxes outside the area range only when no other is
left (such a match, and an unmatched detection outside the range, are ignored); sorts are stable,
so ties in score keep the order detections were given in (images in the order added). The
maxDets cut is per image *and class*. Averages are over the classes with a true box in the area
range; a number with no such class is -1, as COCOeval prints.
"""

from __future__ import annotations

import numpy as np

IOU_THRESHOLDS = np.linspace(.5, .95, 10)
RECALL_THRESHOLDS = np.linspace(0., 1., 101)
# all, small, medium, large, in pixels^2 (COCOeval's areaRng).
AREA_RANGES = ((0., 1e5 ** 2), (0., 32. ** 2), (32. ** 2, 96. ** 2), (96. ** 2, 1e5 ** 2))
CHUNK = 256  # images matched together (numpy's cost per call spread over many)


def _shaped(name, x, spec, sizes, dtype=None):
  """`x` as an array of shape `spec`: ints, or letters bound in `sizes` by their first use."""
  x = np.asarray(x)
  fits = x.ndim == len(spec) and all(
      (sizes.setdefault(e, a) if isinstance(e, str) else e) == a for a, e in zip(x.shape, spec))
  if not fits:
    bound = ', '.join(f'{e}={sizes[e]}' for e in spec if e in sizes)
    raise ValueError(f'{name}: expected shape ({", ".join(map(str, spec))})'
                     f'{" with " + bound if bound else ""}, got {x.shape}')
  if dtype is int and x.size and not np.issubdtype(x.dtype, np.integer):
    raise ValueError(f'{name}: expected integers, got {x.dtype}')
  return x.astype(dtype or np.float64)


def _refuse(name, bad, values, expected, single):
  """ValueError naming the first entry of `name` where `bad` holds, if any."""
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0][int(single):])
    value = values[(0,) * single + index]
    where = f'[{", ".join(map(str, index))}]' if index else ''
    shown = value.tolist() if np.ndim(value) else value
    raise ValueError(f'{name}{where} = {shown}: expected {expected}')


def _valid(name, count, single, batch, size):
  """(B, size) mask of the real entries: the first `count` of each image (all by default)."""
  if count is None:
    return np.ones((batch, size), bool)
  count = _shaped(name, count, () if single else ('B',), {'B': batch}, int).reshape(batch)
  _refuse(name, (count < 0) | (count > size), count[None] if single else count,
          f'a count in [0, {size}]', single)
  return np.arange(size) < count[:, None]


def bb_iou(d: np.ndarray, g: np.ndarray) -> np.ndarray:
  """maskApi's bbIou (iscrowd 0) on (x, y, w, h) boxes, operation for operation in float64:
  (..., D, 4), (..., G, 4) -> (..., D, G)."""
  d, g = d[..., :, None, :], g[..., None, :, :]
  w = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
  h = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
  inter = w * h
  union = d[..., 2] * d[..., 3] + g[..., 2] * g[..., 3] - inter
  overlap = (w > 0) & (h > 0)
  return np.where(overlap, inter / np.where(overlap, union, 1.), 0.)


class CocoEvaluator:
  """Accumulates detections and ground truth image by image (`add`), keeping per detection only
  its class, score, rank in its image and class, and whether it is a true or false positive at
  each IoU threshold and area range; `summarize` gives COCOeval's 12 numbers."""

  def __init__(self, num_classes: int, *, image_size: tuple[int, int] | None,
               iou_thresholds=IOU_THRESHOLDS, max_detections=(1, 10, 100), area_ranges=AREA_RANGES):
    """`image_size`: None for boxes in pixels, (height, width) for boxes in image fractions.
    `area_ranges`: (low, high) in pixels^2 for all, small, medium and large objects."""
    self.num_classes = int(num_classes)
    self.iou_thresholds = np.asarray(iou_thresholds, np.float64).reshape(-1)
    self.max_detections = tuple(int(m) for m in max_detections)
    self.area_ranges = np.asarray(area_ranges, np.float64)
    if self.num_classes < 1:
      raise ValueError(f'num_classes={num_classes!r}: expected >= 1')
    if image_size is not None and (len(image_size) != 2 or min(image_size) <= 0):
      raise ValueError(f'image_size={image_size!r}: expected None (boxes in pixels) or '
                       '(height, width) > 0 (boxes in image fractions)')
    if not self.max_detections or list(self.max_detections) != sorted(set(self.max_detections)) \
        or self.max_detections[0] < 1:
      raise ValueError(f'max_detections={max_detections!r}: expected increasing counts >= 1')
    if self.area_ranges.shape != (4, 2):
      raise ValueError(f'area_ranges={area_ranges!r}: expected 4 (low, high) pairs: all, small, '
                       'medium, large')
    self.scale = None if image_size is None else np.asarray(tuple(image_size) * 2, np.float64)
    self.num_images = 0
    self.num_true = np.zeros((self.num_classes, 4), np.int64)  # per class and area range
    self._pending, self._pending_images = [], 0  # images added, not yet matched
    self._kept = []  # per match: labels, scores, ranks in image and class, outcomes (n, T, A)

  def _in_ranges(self, boxes):
    """(n, 4) pixel boxes -> (n, 4 ranges) whether the area w * h is in the range, bounds in."""
    area = ((boxes[:, 3] - boxes[:, 1]) * (boxes[:, 2] - boxes[:, 0]))[:, None]
    return (area >= self.area_ranges[:, 0]) & (area <= self.area_ranges[:, 1])

  def add(self, boxes, scores, labels, gt_boxes, gt_labels, *, num_detections=None,
          num_objects=None) -> None:
    """One image: `boxes` (K, 4), `scores` (K,), `labels` (K,) detections and `gt_boxes` (N, 4),
    `gt_labels` (N,) true objects, optional int counts of the real ones. Or a batch: the same
    with a leading B and counts (B,). ValueError naming the argument and index of a bad entry."""
    single = np.ndim(boxes) == 2
    if np.ndim(boxes) not in (2, 3):
      raise ValueError(f'boxes: expected shape (K, 4) or (B, K, 4), got {np.shape(boxes)}')
    lead, sizes = () if single else ('B',), {}
    boxes = _shaped('boxes', boxes, (*lead, 'K', 4), sizes)
    scores = _shaped('scores', scores, (*lead, 'K'), sizes)
    labels = _shaped('labels', labels, (*lead, 'K'), sizes, int)
    gt_boxes = _shaped('gt_boxes', gt_boxes, (*lead, 'N', 4), sizes)
    gt_labels = _shaped('gt_labels', gt_labels, (*lead, 'N'), sizes, int)
    if single:
      boxes, scores, labels, gt_boxes, gt_labels = (
          x[None] for x in (boxes, scores, labels, gt_boxes, gt_labels))
    batch = boxes.shape[0]
    dt = _valid('num_detections', num_detections, single, batch, boxes.shape[1])
    gt = _valid('num_objects', num_objects, single, batch, gt_boxes.shape[1])
    for name, x, valid in (('boxes', boxes, dt), ('gt_boxes', gt_boxes, gt)):
      bad = ~np.isfinite(x).all(-1) | (x[..., 0] > x[..., 2]) | (x[..., 1] > x[..., 3])
      _refuse(name, valid & bad, x, 'finite (ymin, xmin, ymax, xmax) with min <= max', single)
    _refuse('scores', dt & ~np.isfinite(scores), scores, 'a finite score', single)
    for name, x, valid in (('labels', labels, dt), ('gt_labels', gt_labels, gt)):
      _refuse(name, valid & ((x < 0) | (x >= self.num_classes)), x,
              f'a class in [0, {self.num_classes})', single)
    if self.scale is not None:
      boxes, gt_boxes = boxes * self.scale, gt_boxes * self.scale
    dt, gt = _flat(boxes, scores, labels, dt), _flat(gt_boxes, None, gt_labels, gt)
    self._pending.append((dt[0] + self.num_images, *dt[1:], gt[0] + self.num_images, *gt[1:]))
    self.num_images, self._pending_images = self.num_images + batch, self._pending_images + batch
    if self._pending_images >= CHUNK:
      self._flush()

  def _flush(self):
    """Matches the pending images' detections; keeps, per detection, what `accumulate` needs."""
    if not self._pending:
      return
    image, boxes, scores, labels, gt_image, gt_boxes, gt_labels = (
        np.concatenate(x) for x in zip(*self._pending))
    self._pending, self._pending_images = [], 0
    classes, max_det = self.num_classes, self.max_detections[-1]
    gt_in = self._in_ranges(gt_boxes)
    np.add.at(self.num_true, gt_labels, gt_in.astype(np.int64))
    # Detections by image, class, then score, stably. COCOeval keeps the best max_det of each
    # (image, class) pair; a later one could not change their matches, and is not kept.
    order = np.lexsort((-scores, labels, image))
    group = image[order] * classes + labels[order]
    rank = np.arange(len(order)) - np.searchsorted(group, group)
    keep = order[rank < max_det]
    group, rank, boxes = group[rank < max_det], rank[rank < max_det], boxes[keep]
    gt_order = np.argsort(gt_image * classes + gt_labels, kind='stable')
    gt_group, gt_boxes, gt_in = (gt_image * classes + gt_labels)[gt_order], gt_boxes[gt_order], \
        gt_in[gt_order]
    gt_slot = np.arange(len(gt_group)) - np.searchsorted(gt_group, gt_group)
    shape = (len(group), len(self.iou_thresholds), 4)
    hit, hit_ignored = np.zeros(shape, bool), np.zeros(shape, bool)
    # The (image, class) pairs with detections and objects need matching; in buckets of 2^i
    # objects, to pad little.
    pairs, objects = np.unique(gt_group, return_counts=True)
    objects, pairs = objects[np.isin(pairs, group)], pairs[np.isin(pairs, group)]
    bucket = np.ceil(np.log2(objects))
    for these in (pairs[bucket == b] for b in np.unique(bucket)):
      d_in, g_in = np.flatnonzero(np.isin(group, these)), np.flatnonzero(np.isin(gt_group, these))
      d_at = np.searchsorted(these, group[d_in]), rank[d_in]
      g_at = np.searchsorted(these, gt_group[g_in]), gt_slot[g_in]
      size = len(these), d_at[1].max() + 1, g_at[1].max() + 1
      d_xywh, g_xywh = np.zeros((*size[:2], 4)), np.zeros((size[0], size[2], 4))
      d_xywh[d_at], g_xywh[g_at] = _xywh(boxes[d_in]), _xywh(gt_boxes[g_in])
      d_real, g_real = np.zeros(size[:2], bool), np.zeros((size[0], size[2]), bool)
      d_real[d_at], g_real[g_at] = True, True
      ious = np.where(d_real[:, :, None] & g_real[:, None, :], bb_iou(d_xywh, g_xywh), -1.)
      ignore = np.ones((size[0], 4, size[2]), bool)  # (pair, area range, object)
      ignore[g_at[0], :, g_at[1]] = ~gt_in[g_in]
      found, found_ignored = self._match(ious, ignore)
      hit[d_in], hit_ignored[d_in] = found[d_at], found_ignored[d_at]
    # Ignored: matched to an ignored object, or unmatched and outside the area range.
    ignored = hit_ignored | (~hit & ~self._in_ranges(boxes)[:, None, :])
    outcome = np.where(ignored, 0, np.where(hit, 1, -1)).astype(np.int8)
    self._kept.append((group % classes, scores[keep], rank, outcome))

  def _match(self, ious, ignore):
    """COCOeval.evaluateImg's greedy matching, of every pair at once. `ious` (P, D, G), -1 where
    no box; `ignore` (P, A, G) -> (P, D, T, A) matched, and matched to an ignored object."""
    threshold = np.minimum(self.iou_thresholds, 1 - 1e-10)[:, None, None]  # (T, 1, 1)
    shape = (*ious.shape[:2], len(threshold), ignore.shape[1])
    found, found_ignored = np.zeros(shape, bool), np.zeros(shape, bool)
    # Only detections reaching the lowest threshold can match. Pairs with the most of them first:
    # step i works on the pairs that have an i-th, a prefix.
    can = (ious >= threshold.min()).any(-1)
    count = can.sum(1)
    pairs = np.argsort(-count, kind='stable')
    count, order = count[pairs], np.argsort(~can[pairs], axis=1, kind='stable')
    ious, regular = np.take_along_axis(ious[pairs], order[..., None], 1), ~ignore[pairs, None]
    taken = np.zeros((len(pairs), *shape[2:], ious.shape[2]), bool)
    objects = np.arange(ious.shape[2])
    for step in range(count.max(initial=0)):
      n = np.count_nonzero(count > step)
      iou = ious[:n, step, None, None, :]  # (n, 1, 1, G)
      free = (iou >= threshold) & ~taken[:n]
      regular_free = free & regular[:n]
      has_regular = regular_free.any(-1)
      pool = np.where(has_regular[..., None], regular_free, free)
      # The best IoU in the pool; of equals the later object (COCOeval compares with `<`).
      best = objects[-1] - np.argmax(np.where(pool, iou, -1.)[..., ::-1], -1)
      match = pool.any(-1)
      taken[:n] |= match[..., None] & (objects == best[..., None])
      at = pairs[:n], order[:n, step]
      found[at], found_ignored[at] = match, match & ~has_regular
    return found, found_ignored

  def accumulate(self) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval.accumulate: precision (T, R=101, K, A=4, M) at the recall thresholds and recall
    (T, K, A, M), -1 for a class without true objects in the area range."""
    self._flush()
    self._kept = [tuple(np.concatenate(x) for x in zip(*self._kept))] if self._kept else []
    labels, scores, rank, outcome = self._kept[0] if self._kept else [np.zeros(0)] * 4
    T, R, K, A = len(self.iou_thresholds), len(RECALL_THRESHOLDS), self.num_classes, 4
    precision = -np.ones((T, R, K, A, len(self.max_detections)))
    recall = -np.ones((T, K, A, len(self.max_detections)))
    for k in np.flatnonzero(self.num_true.any(1)):
      counted = self.num_true[k] > 0
      npig = np.tile(np.maximum(self.num_true[k], 1), T)  # objects of each row (t, a)
      # Best score first; ties in the order kept (images as added), as COCOeval's mergesort.
      of_k = np.flatnonzero(labels == k)
      of_k = of_k[np.argsort(-scores[of_k], kind='stable')]
      for m, max_det in enumerate(self.max_detections):
        chosen = of_k[rank[of_k] < max_det]
        n = len(chosen)
        if not n:
          recall[:, k, counted, m], precision[:, :, k, counted, m] = 0., 0.
          continue
        # Rows (t, a), columns the detections: counts of true and of all positives (fp + tp).
        outcomes = outcome[chosen].reshape(n, -1).T
        tps = np.cumsum(outcomes == 1, 1, dtype=np.int32)
        pr = tps.astype(float) / (np.cumsum(outcomes != 0, 1, dtype=np.int32) + np.spacing(1))
        pr = np.maximum.accumulate(pr[:, ::-1], 1)[:, ::-1]  # precision made monotone
        # COCOeval's np.searchsorted(rc, recall thresholds, 'left') with rc = tp / npig, in every
        # row at once: rc < x exactly when tp < the least c with c / npig >= x; one search of the
        # rows' tp laid end to end (offsets keep them sorted) finds where that is.
        least = [np.searchsorted(np.arange(n + 1) / g, RECALL_THRESHOLDS) for g in npig[:A]]
        offset = np.arange(T * A)[:, None] * (n + 2)
        at = np.searchsorted((tps + offset).ravel(), np.tile(least, (T, 1)) + offset)
        at -= offset // (n + 2) * n
        q = np.where(at < n, np.take_along_axis(pr, np.minimum(at, n - 1), 1), 0.)
        recall[:, k, counted, m] = (tps[:, -1] / npig).reshape(T, A)[:, counted]
        precision[:, :, k, counted, m] = q.reshape(T, A, R).transpose(0, 2, 1)[..., counted]
    return precision, recall

  def summarize(self) -> dict[str, float]:
    """COCOeval's 12 numbers: 'AP' (IoU .50:.95), 'AP50', 'AP75', 'APs', 'APm', 'APl' at the
    most detections; 'AR<m>' for each of `max_detections` (AR1, AR10, AR100), 'ARs', 'ARm', 'ARl'
    at the most. -1 where no class has a true object (or the IoU threshold is not evaluated)."""
    precision, recall = self.accumulate()

    def mean(s):
      return float(np.mean(s[s > -1])) if (s > -1).any() else -1.

    def at(iou):
      return np.flatnonzero(np.isclose(self.iou_thresholds, iou))

    out = {'AP': mean(precision[..., 0, -1]), 'AP50': mean(precision[at(.5)][..., 0, -1]),
           'AP75': mean(precision[at(.75)][..., 0, -1])}
    out.update({f'AP{s}': mean(precision[..., a, -1]) for a, s in enumerate('sml', 1)})
    out.update({f'AR{m}': mean(recall[..., 0, i]) for i, m in enumerate(self.max_detections)})
    out.update({f'AR{s}': mean(recall[..., a, -1]) for a, s in enumerate('sml', 1)})
    return out


def _xywh(boxes):
  """(n, 4) (ymin, xmin, ymax, xmax) -> pycocotools' (x, y, width, height)."""
  return np.stack([boxes[:, 1], boxes[:, 0], boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]],
                  -1)


def _flat(boxes, scores, labels, valid):
  """The real entries of a batch, image by image: image index, boxes, (scores,) labels."""
  image, slot = np.nonzero(valid)
  return (image, boxes[image, slot], *(() if scores is None else (scores[image, slot],)),
          labels[image, slot].astype(np.int64))


__all__ = ['CocoEvaluator', 'IOU_THRESHOLDS', 'RECALL_THRESHOLDS', 'AREA_RANGES', 'bb_iou']
