"""The images to explain, as uint8 (N, H, W, C) at a run's input shape: a dataset split's examples
(read a chunk at a time), or image files (PNG, JPEG) and .npy arrays resized to the run's input."""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np

READ_CHUNK = 1024  # examples read from a data source at a time


def _fit(image: np.ndarray, shape: Sequence[int], what: str) -> np.ndarray:
  """(h, w, c) uint8 -> (H, W, C): the shorter side resized and the centre cropped (as the
  pipelines resize), or a plain resize for a non-square input. Channels must already agree."""
  from PIL import Image
  from cnnlab.data import sources
  height, width, channels = shape
  if image.shape[-1] != channels:
    raise ValueError(f'{what} has {image.shape[-1]} channels, the run takes {channels} '
                     f'(input {tuple(shape)})')
  if image.shape[:2] == (height, width):
    return image
  if height == width:
    return sources.resize_center_crop(image, height)
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  resized = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))
  return resized[..., None] if channels == 1 else resized


def from_files(paths: Sequence[str], image_shape: Sequence[int]) -> np.ndarray:
  """uint8 (N, H, W, C) from PNG/JPEG files (converted to the run's channels: 'L' or 'RGB') and
  .npy files holding uint8 (H, W[, C]) or (N, H, W[, C]) arrays, each resized to `image_shape`."""
  from PIL import Image
  channels = image_shape[-1]
  images = []
  for path in paths:
    if not os.path.exists(path):
      raise ValueError(f'no image file {path!r}')
    if path.lower().endswith('.npy'):
      array = np.load(path, allow_pickle=False)
      if array.dtype != np.uint8:
        raise ValueError(f'{path}: expected uint8 images (0..255), got {array.dtype}; convert '
                         'them, e.g. np.round(x * 255).astype(np.uint8) for 0..1 floats')
      if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        array = array[..., None]  # (H, W) or (N, H, W): grayscale without a channel axis
      if array.ndim == 3:
        array = array[None]
      if array.ndim != 4:
        raise ValueError(f'{path}: expected (H, W[, C]) or (N, H, W[, C]) images, got '
                         f'shape {array.shape}')
      images.extend(_fit(a, image_shape, f'{path} (shape {array.shape})') for a in array)
      continue
    try:
      with Image.open(path) as pil:
        array = np.asarray(pil.convert('L' if channels == 1 else 'RGB'))
    except OSError as e:
      raise ValueError(f'cannot read image {path!r}: {e}') from None
    if channels not in (1, 3):
      raise ValueError(f'{path}: image files give 1 or 3 channels, the run takes {channels}')
    images.append(_fit(array[..., None] if channels == 1 else array, image_shape, path))
  if not images:
    raise ValueError('no images given')
  return np.stack(images)


def _dataset(run, name: str, split: str):
  """(source, converter, count, info) for `name`/`split` at the run's input shape."""
  from cnnlab import data
  from cnnlab.data import sources
  config = run.config
  same = name == config.data.name
  kwargs = data.builder_kwargs(config.data) if same else {}
  image_size = config.data.image_size if same else None
  info = data.info(name, data_dir=config.data.data_dir, image_size=image_size, **kwargs)
  height, width, channels = run.image_shape
  if info.image_shape[-1] != channels:
    raise ValueError(f'{name} has {info.image_shape[-1]}-channel images, the run takes '
                     f'{channels} (input {tuple(run.image_shape)})')
  if tuple(info.image_shape[:2]) != (height, width):
    if height != width:
      raise ValueError(f'{name} images are {info.image_shape[:2]}, the run takes {(height, width)}')
    image_size = height
    info = data.info(name, data_dir=config.data.data_dir, image_size=image_size, **kwargs)
  source = data.load(name, split, data_dir=config.data.data_dir, **kwargs)
  return source, sources.RecordConverter(info, split, image_size), len(source), info


def iterate_dataset(run, name: str, split: str = 'test', limit: int | None = None,
                    chunk: int = READ_CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(images uint8 (n, H, W, C), labels (n,)) chunks of the first `limit` examples (all: None)."""
  from cnnlab.data import sources
  source, convert, count, info = _dataset(run, name, split)
  count = count if limit is None else min(count, limit)
  for start in range(0, count, chunk):
    indices = np.arange(start, min(count, start + chunk))
    examples = [convert(record, int(i)) for i, record in
                zip(indices, sources.read_records(source, indices, name=info.name, split=split))]
    yield (np.stack([e['image'] for e in examples]),
           np.asarray([e['label'] for e in examples], np.int32))


def from_dataset(run, name: str, split: str = 'test',
                 num: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """The first `num` examples of `name`/`split`: images uint8 (num, H, W, C), labels (num,)."""
  chunks = list(iterate_dataset(run, name, split, limit=num))
  if not chunks:
    raise ValueError(f'{name}/{split} has no examples')
  return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


__all__ = ['from_files', 'from_dataset', 'iterate_dataset']
