"""From data-source records to validated examples, one at a time (grain) or a whole split (device).

A record is whatever a TFDS data source returns (a dict of numpy values, with extra features such
as `id`); an example is what the pipelines batch:
  image (H, W, C) uint8, label () int32, and mask (H, W) uint8 / bbox (4,) float32 where present;
  a multi-object dataset (info.max_objects = N) has labels (N,) int32, boxes (N, 4) float32,
  num_objects () int32 and instances (H, W) uint8 instead of label and bbox (`example_spec`).
Every record is checked against the dataset's `DatasetInfo`, so corrupt or mismatched data stops
with the dataset, split, index and the shapes involved instead of reaching a batch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cnnlab.data import registry
from cnnlab.data.checks import bad_boxes
from cnnlab.data.errors import DataError
from cnnlab.data.shapes import PAD_LABEL

READ_CHUNK = 1024  # records fetched per `__getitems__` call when reading a whole split


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """(H, W, C) uint8 -> (size, size, C): shorter side to `size` (antialiased bilinear), then the
  centre square."""
  height, width, channels = image.shape
  scale = size / min(height, width)
  new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  resized = np.asarray(pil.resize((new_w, new_h), Image.Resampling.BILINEAR))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  resized = resized[top:top + size, left:left + size]
  return resized[..., None] if channels == 1 else resized


def example_spec(info: registry.DatasetInfo) -> dict[str, tuple[tuple[int, ...], type]]:
  """{key: (shape, dtype)} of one example of the dataset `info` describes (`example_keys`)."""
  h, w, c = info.image_shape
  n = info.max_objects
  spec = {'image': ((h, w, c), np.uint8), 'label': ((), np.int32), 'labels': ((n,), np.int32),
          'boxes': ((n, 4), np.float32), 'num_objects': ((), np.int32), 'mask': ((h, w), np.uint8),
          'instances': ((h, w), np.uint8), 'bbox': ((4,), np.float32)}
  return {key: spec[key] for key in info.example_keys()}


class RecordConverter:
  """Record -> example, validated against `info`; picklable, so grain workers can run it."""

  def __init__(self, info: registry.DatasetInfo, split: str, image_size: int | None = None):
    self.info = info
    self.split = split
    self.image_size = image_size

  def _fail(self, index: int, what: str) -> DataError:
    return DataError(f'{self.info.name}/{self.split} example {index}: {what}. The cached data is '
                     'corrupt or from other settings: delete it and prepare it again.')

  def __call__(self, record: dict, index: int) -> dict[str, np.ndarray]:
    image = np.asarray(record['image'])
    if image.ndim == 2:  # some sources drop a grayscale channel axis
      image = image[..., None]
    if image.ndim == 3 and self.image_size and image.shape[:2] != (self.image_size,) * 2:
      image = resize_center_crop(image, self.image_size)
    expected = self.info.image_shape
    if image.shape != expected or image.dtype != np.uint8:
      raise self._fail(index, f'image {image.shape} {image.dtype}, expected {expected} uint8')
    example = {'image': image}
    if self.info.max_objects:
      example.update(self._objects(record, index))
    else:
      label = int(record['label'])
      if not 0 <= label < self.info.num_classes:
        raise self._fail(index, f'label {label} outside [0, {self.info.num_classes})')
      example['label'] = np.int32(label)
    mask_keys = ('mask', 'instances') if self.info.max_objects else ('mask',)
    for key in mask_keys if self.info.has_mask else ():
      mask = np.asarray(record[key])
      if mask.shape != expected[:2] or mask.dtype != np.uint8:
        raise self._fail(index, f'{key} {mask.shape} {mask.dtype}, expected {expected[:2]} uint8')
      example[key] = mask
    if 'instances' in example and example['instances'].max() > example['num_objects']:
      raise self._fail(index, f'instance id {example["instances"].max()} above num_objects='
                       f'{example["num_objects"]}')
    if self.info.has_bbox:
      example['bbox'] = np.asarray(record['bbox'], np.float32).reshape(4)
      if bad_boxes(example['bbox']):
        raise self._fail(index, f'bbox {example["bbox"].tolist()} is not (ymin, xmin, ymax, xmax) '
                         'with 0 <= min <= max <= 1')
    return example

  def _objects(self, record: dict, index: int) -> dict[str, np.ndarray]:
    """labels, boxes and num_objects of a multi-object record, checked object by object."""
    n, classes = self.info.max_objects, self.info.num_classes
    labels = np.asarray(record['labels'])
    boxes = np.asarray(record['boxes'], np.float32)
    count = int(record['num_objects'])
    if labels.shape != (n,) or boxes.shape != (n, 4):
      raise self._fail(index, f'labels {labels.shape} and boxes {boxes.shape}, expected ({n},) '
                       f'and ({n}, 4) for max_objects={n}')
    if not 0 <= count <= n:
      raise self._fail(index, f'num_objects={count} outside [0, {n}] (max_objects={n})')
    for i in range(n):
      if i < count and not 0 <= labels[i] < classes:
        raise self._fail(index, f'object {i}: label {labels[i]} outside [0, {classes})')
      if i >= count and labels[i] != PAD_LABEL:
        raise self._fail(index, f'object {i} is padding (num_objects={count}) but has label '
                         f'{labels[i]}, not {PAD_LABEL}')
      if i < count and bad_boxes(boxes[i]):
        raise self._fail(index, f'object {i}: box {boxes[i].tolist()} is not (ymin, xmin, ymax, '
                         'xmax) with 0 <= min <= max <= 1')
    return {'labels': labels.astype(np.int32), 'boxes': boxes, 'num_objects': np.int32(count)}


def read_records(source, indices, *, name: str, split: str) -> list[dict]:
  """source.__getitems__(indices), with read failures named by dataset and split."""
  try:
    if hasattr(source, '__getitems__'):
      return source.__getitems__([int(i) for i in indices])
    return [source[int(i)] for i in indices]
  except DataError:
    raise
  except Exception as e:  # array_record / deserialisation errors on a damaged file
    where = getattr(getattr(source, 'dataset_info', None), 'data_dir', 'the data directory')
    raise DataError(f'cannot read {name}/{split} records {int(indices[0])}..{int(indices[-1])} '
                    f'from {where}: {type(e).__name__}: {e}. The cached files are corrupt: delete '
                    'them and prepare the dataset again.') from e


def read_split(info: registry.DatasetInfo, split: str, source, *,
               image_size: int | None = None) -> dict[str, np.ndarray]:
  """The whole split as arrays: image (N, H, W, C) uint8, label (N,) int32, mask, bbox (or the
  multi-object keys), each with the leading example axis (`example_spec`)."""
  n = len(source)
  if n != info.split_size(split):
    raise DataError(f'{info.name}/{split} has {n} records, its dataset info says '
                    f'{info.split_size(split)}: the cached data is incomplete or mismatched')
  convert = RecordConverter(info, split, image_size)
  arrays = {key: np.empty((n, *shape), dtype) for key, (shape, dtype) in example_spec(info).items()}
  for start in range(0, n, READ_CHUNK):
    indices = np.arange(start, min(n, start + READ_CHUNK))
    for i, record in zip(indices, read_records(source, indices, name=info.name, split=split)):
      for key, value in convert(record, int(i)).items():
        arrays[key][i] = value
  return arrays
