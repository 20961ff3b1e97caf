"""`check_batch`: the trainer's guard on the first batch, before anything is compiled around it."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from cnnlab.data.errors import DataError
from cnnlab.data.shapes import PAD_LABEL


def _host(x) -> np.ndarray:
  """The values of x this process can see (all of them on one host; its shards on many)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.concatenate([np.asarray(s.data).reshape(-1) for s in x.addressable_shards])
  return np.asarray(x)


def bad_boxes(boxes: np.ndarray) -> np.ndarray:
  """(...,) bool: which (..., 4) (ymin, xmin, ymax, xmax) boxes break 0 <= min <= max <= 1."""
  ymin, xmin, ymax, xmax = np.moveaxis(boxes, -1, 0)
  ordered = (0 <= ymin) & (ymin <= ymax) & (ymax <= 1) & (0 <= xmin) & (xmin <= xmax) & (xmax <= 1)
  return ~ordered  # NaN fails every comparison: bad too


def check_batch(batch: dict, *, image_shape: Sequence[int], num_classes: int) -> None:
  """Raises DataError (a ValueError) unless `batch` fits a model for (H, W, C) images and
  `num_classes` classes: image (B, H, W, C) uint8 or float, label (B,) ints in [0, num_classes),
  and, where present, mask (B, H, W) in [0, num_classes] and bbox (B, 4) ordered within [0, 1].

  The required keys follow what the batch holds: a multi-object (detection) batch has 'labels'
  (B, N) instead of one 'label' per example, so 'label' is required only when there is no
  'labels', and 'labels' brings 'boxes' (B, N, 4) and 'num_objects' (B,) with it. For those, the
  counted objects (index < num_objects[b] <= N) have labels in [0, num_classes) and boxes ordered
  within [0, 1], the others label PAD_LABEL (-1); 'instances' (B, H, W), where present, holds ids
  0..N. Errors name the example's index in the batch (and the object's).
  """
  expected = tuple(int(s) for s in image_shape)
  objects = 'labels' in batch
  required = ('image', 'labels', 'boxes', 'num_objects') if objects else ('image', 'label')
  for key in required:
    if key not in batch:
      raise DataError(f'batch has no {key!r} (keys: {sorted(batch)})')
  image = batch['image']
  if image.ndim != 4 or tuple(image.shape[1:]) != expected:
    raise DataError(f'images of shape {tuple(image.shape)} do not fit the model: expected '
                    f'(batch, {", ".join(map(str, expected))}) (NHWC, H={expected[0]}, '
                    f'W={expected[1]}, C={expected[2]})')
  dtype = np.dtype(image.dtype)
  if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
    raise DataError(f'images have dtype {dtype}, expected uint8 (0..255) or a float type')
  size = image.shape[0]
  if objects:
    _check_objects(batch, size, num_classes, expected)
  else:
    label = batch['label']
    if tuple(label.shape) != (size,) or not np.issubdtype(np.dtype(label.dtype), np.integer):
      raise DataError(f'labels must be ({size},) integers, got shape {tuple(label.shape)} dtype '
                      f'{label.dtype}')
    values = _host(label)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
      raise DataError(f'labels outside [0, {num_classes}): {sorted(set(bad.tolist()))[:10]} '
                      f'(the model has {num_classes} classes)')
  if 'mask' in batch:
    mask = batch['mask']
    if tuple(mask.shape) != (size, *expected[:2]):
      raise DataError(f'mask of shape {tuple(mask.shape)}, expected {(size, *expected[:2])}')
    if _host(mask).max(initial=0) > num_classes:
      raise DataError(f'mask values above {num_classes} (0 = background, k + 1 = class k)')
  if 'bbox' in batch:
    box = batch['bbox']
    if tuple(box.shape) != (size, 4):
      raise DataError(f'bbox of shape {tuple(box.shape)}, expected ({size}, 4)')
    b = _host(box).reshape(-1, 4)
    bad = np.flatnonzero(bad_boxes(b))
    if bad.size:
      raise DataError(f'bbox values must be (ymin, xmin, ymax, xmax) with 0 <= min <= max <= 1: '
                      f'example {bad[0]} of the batch has {b[bad[0]].tolist()}'
                      + (f' ({bad.size} bad in all)' if bad.size > 1 else ''))


def _check_objects(batch: dict, size: int, num_classes: int, expected: tuple[int, ...]) -> None:
  """The multi-object keys of `check_batch`: labels, boxes, num_objects and instances."""
  labels, boxes, count = batch['labels'], batch['boxes'], batch['num_objects']
  if labels.ndim != 2 or labels.shape[0] != size:
    raise DataError(f'labels of shape {tuple(labels.shape)}, expected ({size}, N) for N objects')
  n = labels.shape[1]
  for key, value, shape in (('labels', labels, (size, n)), ('num_objects', count, (size,))):
    if tuple(value.shape) != shape or not np.issubdtype(np.dtype(value.dtype), np.integer):
      raise DataError(f'{key} must be {shape} integers, got shape {tuple(value.shape)} dtype '
                      f'{value.dtype}')
  if tuple(boxes.shape) != (size, n, 4):
    raise DataError(f'boxes of shape {tuple(boxes.shape)}, expected ({size}, {n}, 4)')
  # On several hosts, this process's rows (the examples' indices are then among those rows).
  labels, boxes, count = (_host(labels).reshape(-1, n), _host(boxes).reshape(-1, n, 4),
                          _host(count).reshape(-1))
  if not len(labels) == len(boxes) == len(count):
    return  # shards of other layouts: the shape checks above are what can be said
  bad = np.flatnonzero((count < 0) | (count > n))
  if bad.size:
    raise DataError(f'example {bad[0]} of the batch has num_objects={count[bad[0]]}, outside '
                    f'[0, {n}] (N = {n} objects per example)')
  counted = np.arange(n)[None, :] < count[:, None]  # (B, N)
  problems = [
      (counted & ((labels < 0) | (labels >= num_classes)),
       lambda b, i: f'label {labels[b, i]} outside [0, {num_classes})'),
      (~counted & (labels != PAD_LABEL),
       lambda b, i: f'label {labels[b, i]} after num_objects={count[b]}: padding must be '
                    f'{PAD_LABEL}'),
      (counted & bad_boxes(boxes),
       lambda b, i: f'box {boxes[b, i].tolist()} is not (ymin, xmin, ymax, xmax) with '
                    '0 <= min <= max <= 1'),
  ]
  for wrong, describe in problems:
    if wrong.any():
      b, i = np.argwhere(wrong)[0]
      raise DataError(f'example {b} of the batch, object {i}: {describe(b, i)}')
  if 'instances' in batch:
    instances = batch['instances']
    if tuple(instances.shape) != (size, *expected[:2]):
      raise DataError(f'instances of shape {tuple(instances.shape)}, expected '
                      f'{(size, *expected[:2])}')
    if _host(instances).max(initial=0) > n:
      raise DataError(f'instance ids above N = {n} (0 = background, i + 1 = object i)')
