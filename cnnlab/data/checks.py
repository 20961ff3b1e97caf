"""`check_batch`: the trainer's guard on the first batch, before anything is compiled around it."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from cnnlab.data.errors import DataError


def _host(x) -> np.ndarray:
  """The values of x this process can see (all of them on one host; its shards on many)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.concatenate([np.asarray(s.data).reshape(-1) for s in x.addressable_shards])
  return np.asarray(x)


def check_batch(batch: dict, *, image_shape: Sequence[int], num_classes: int) -> None:
  """Raises DataError (a ValueError) unless `batch` fits a model for (H, W, C) images and
  `num_classes` classes: image (B, H, W, C) uint8 or float, label (B,) ints in [0, num_classes),
  and, where present, mask (B, H, W) in [0, num_classes] and bbox (B, 4) ordered within [0, 1].
  """
  expected = tuple(int(s) for s in image_shape)
  for key in ('image', 'label'):
    if key not in batch:
      raise DataError(f'batch has no {key!r} (keys: {sorted(batch)})')
  image, label = batch['image'], batch['label']
  if image.ndim != 4 or tuple(image.shape[1:]) != expected:
    raise DataError(f'images of shape {tuple(image.shape)} do not fit the model: expected '
                    f'(batch, {", ".join(map(str, expected))}) (NHWC, H={expected[0]}, '
                    f'W={expected[1]}, C={expected[2]})')
  dtype = np.dtype(image.dtype)
  if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
    raise DataError(f'images have dtype {dtype}, expected uint8 (0..255) or a float type')
  size = image.shape[0]
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
    if ((b < 0) | (b > 1)).any() or (b[:, 0] > b[:, 2]).any() or (b[:, 1] > b[:, 3]).any():
      raise DataError('bbox values must be (ymin, xmin, ymax, xmax) with 0 <= min <= max <= 1')
