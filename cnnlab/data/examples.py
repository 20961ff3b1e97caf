"""Examples for a trained network to look at, as uint8 (N, H, W, C) at its input shape: the first
examples of a dataset split (read a chunk at a time, with whatever targets the dataset has), or a
person's own pictures (PNG/JPEG files, directories of them, .npy arrays), fitted to the input.

  read_images(paths, image_shape)                   your pictures -> uint8 (N, H, W, C)
  iterate(data_config, image_shape, name, split)    chunks {'image', 'label', 'mask'?, 'bbox'?}
  first(data_config, image_shape, name, split, n)   the first n, as one dict of arrays
  at(data_config, image_shape, name, split, idx)    the examples at those indices

`data_config` is the run's `config.data`: its data directory, and its builder settings and image
size when `name` is the run's own dataset. `cnnlab predict`, `cnnlab explain` and `cnnlab embed`
read their examples here.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
READ_CHUNK = 1024  # examples read from a data source at a time


def _fit(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """(h, w, c) uint8 -> (H, W, C): grey <-> RGB converted; the shorter side resized and the centre
  cropped (as the pipelines resize) for a square input, a plain bilinear resize otherwise."""
  from PIL import Image
  from cnnlab.data import sources
  height, width, channels = shape
  if image.shape[-1] != channels:
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    image = np.asarray(pil.convert('L' if channels == 1 else 'RGB'))
    image = image[..., None] if channels == 1 else image
  if image.shape[:2] == (height, width):
    return image
  if height == width:
    return sources.resize_center_crop(image, height)
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  resized = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))
  return resized[..., None] if channels == 1 else resized


def _from_npy(path: str) -> np.ndarray:
  """uint8 (N, H, W, C) from a .npy of (H, W[, C]) or (N, H, W[, C]) uint8 or 0..1 floats."""
  try:
    array = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path}: not a readable .npy array ({e})') from None
  if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] not in (1, 3)):
    array = array[..., None]  # (H, W) or (N, H, W): grey without a channel axis
  if array.ndim == 3:
    array = array[None]
  if array.ndim != 4 or array.shape[-1] not in (1, 3) or not array.size:
    raise ValueError(f'{path}: an array of shape {array.shape}; expected (N, H, W, C) with C = 1 '
                     'or 3, (N, H, W) or one (H, W[, C]) image')
  if array.dtype != np.uint8:
    if not np.issubdtype(array.dtype, np.floating) or array.min() < 0 or array.max() > 1:
      raise ValueError(f'{path}: {array.dtype} values {array.min():.3g}..{array.max():.3g}; '
                       'expected uint8 (0..255) or floats in 0..1')
    array = np.round(array * 255).astype(np.uint8)
  return array


def read_images(paths: str | Sequence[str], image_shape: Sequence[int]) -> np.ndarray:
  """uint8 (N, H, W, C) at `image_shape` from image files, directories of them (sorted by name)
  and .npy arrays, in the order given; each converted to the input's channels and resized."""
  from PIL import Image
  paths = [paths] if isinstance(paths, str) else list(paths)
  if tuple(image_shape)[-1] not in (1, 3):
    raise ValueError(f'pictures give 1 or 3 channels; the input is {tuple(image_shape)}')
  images = []
  for path in paths:
    if os.path.isdir(path):
      files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
      if not files:
        raise ValueError(f'{path}: no {"/".join(IMAGE_SUFFIXES)} files in the directory')
      images.extend(read_images([os.path.join(path, f) for f in files], image_shape))
    elif not os.path.exists(path):
      raise ValueError(f'no image file {path!r}')
    elif path.lower().endswith('.npy'):
      images.extend(_fit(a, image_shape) for a in _from_npy(path))
    else:
      try:
        with Image.open(path) as pil:
          array = np.asarray(pil.convert('RGB'))
      except OSError as e:
        raise ValueError(f'cannot read image {path!r}: {e}') from None
      images.append(_fit(array, image_shape))
  if not images:
    raise ValueError('no images given')
  return np.stack(images)


def _source(data_config, image_shape: Sequence[int], name: str, split: str):
  """(source, converter, info) for `name`/`split`, its images fitted to `image_shape`."""
  from cnnlab import data
  from cnnlab.data import sources
  same = name == data_config.name
  kwargs = data.builder_kwargs(data_config) if same else {}
  image_size = data_config.image_size if same else None
  info = data.info(name, data_dir=data_config.data_dir, image_size=image_size, **kwargs)
  height, width, channels = image_shape
  if info.image_shape[-1] != channels:
    raise ValueError(f'{name} has {info.image_shape[-1]}-channel images; the input takes '
                     f'{channels} ({height}x{width}x{channels})')
  if tuple(info.image_shape[:2]) != (height, width):
    if height != width or info.has_mask:
      raise ValueError(f'{name} images are {info.image_shape[0]}x{info.image_shape[1]}; the input '
                       f'takes {height}x{width}' + (' (masks are not resized)' if info.has_mask
                                                    else ''))
    image_size = height
    info = data.info(name, data_dir=data_config.data_dir, image_size=image_size, **kwargs)
  source = data.load(name, split, data_dir=data_config.data_dir, **kwargs)
  return source, sources.RecordConverter(info, split, image_size), info


def _convert(source, convert, info, split: str, indices) -> dict[str, np.ndarray]:
  from cnnlab.data import sources
  records = sources.read_records(source, indices, name=info.name, split=split)
  converted = [convert(record, int(i)) for i, record in zip(indices, records)]
  return {key: np.stack([e[key] for e in converted]) for key in converted[0]}


def iterate(data_config, image_shape: Sequence[int], name: str, split: str = 'test',
            limit: int | None = None,
            chunk: int = READ_CHUNK) -> Iterator[dict[str, np.ndarray]]:
  """Chunks of the first `limit` examples (None: all) of `name`/`split`, each a dict of arrays:
  image uint8 (n, H, W, C), label (n,), and mask / bbox where the dataset has them."""
  source, convert, info = _source(data_config, image_shape, name, split)
  count = len(source) if limit is None else min(len(source), limit)
  for start in range(0, count, chunk):
    yield _convert(source, convert, info, split, np.arange(start, min(count, start + chunk)))


def at(data_config, image_shape: Sequence[int], name: str, split: str,
       indices: Sequence[int]) -> dict[str, np.ndarray]:
  """The examples of `name`/`split` at `indices` (in that order), as one dict of arrays."""
  source, convert, info = _source(data_config, image_shape, name, split)
  indices = np.asarray(indices, np.int64).reshape(-1)
  bad = indices[(indices < 0) | (indices >= len(source))]
  if not len(indices) or len(bad):
    raise ValueError(f'{name}/{split} has examples 0..{len(source) - 1}; asked for '
                     f'{bad.tolist() if len(bad) else "none"}')
  return _convert(source, convert, info, split, indices)


def first(data_config, image_shape: Sequence[int], name: str, split: str = 'test',
          num: int = 16) -> dict[str, np.ndarray]:
  """The first `num` examples of `name`/`split` as one dict of arrays (see `iterate`)."""
  chunks = list(iterate(data_config, image_shape, name, split, limit=num))
  if not chunks:
    raise ValueError(f'{name}/{split} has no examples')
  return {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]}


__all__ = ['IMAGE_SUFFIXES', 'at', 'first', 'iterate', 'read_images']
