"""Dataset names, the data directory, and `load` / `info` / `prepare` for every dataset.

Embedded datasets (`digits`, `mnist5k`, `shapes`) are TFDS builders that generate themselves into
the data directory on first use; `synthetic` is generated on demand; public datasets are TFDS
datasets prepared once with `cnnlab prepare`. All of them are read by random access through a
TFDS data source (`synthetic` through a source with the same interface).
"""

from __future__ import annotations

import dataclasses
import difflib
import fcntl
import os

import tensorflow_datasets as tfds

from cnnlab.data import public, synthetic
from cnnlab.data.builders import FORMAT_VERSION, Digits, EmbeddedBuilder, Mnist5k
from cnnlab.data.errors import DataError
from cnnlab.data.shapes import Shapes

BUILDERS: dict[str, type[EmbeddedBuilder]] = {
    'digits': Digits, 'mnist5k': Mnist5k, 'shapes': Shapes}
EMBEDDED = (*BUILDERS, 'synthetic')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model and a pipeline need to know about a dataset.

  image_shape is (H, W, C) as the pipelines deliver it (after `image_size` resizing). mean and std
  are per channel on the 0..1 scale, from the train split. Segmentation masks, where present, hold
  `num_mask_classes = num_classes + 1` values (0 = background, k + 1 = class k). max_objects = N
  >= 1: several objects per image, with `labels`, `boxes`, `num_objects` (and `instances` with the
  mask) instead of `label` (`example_keys`).
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  splits: dict[str, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  has_mask: bool = False
  has_bbox: bool = False
  num_mask_classes: int = 0
  eval_split: str = 'test'
  class_names: tuple[str, ...] | None = None  # label k's name, where the dataset has names  # the held-out split's name ('validation' for ImageNet-style sets)
  max_objects: int = 0  # N, the padded object count of a detection dataset; 0 = one label

  def example_keys(self) -> tuple[str, ...]:
    """The keys of every example (and batch, before the pipelines' 'index', 'epoch', 'valid')."""
    if self.max_objects:
      return ('image', 'labels', 'boxes', 'num_objects',
              *(('mask', 'instances') if self.has_mask else ()))
    return ('image', 'label', *(('mask',) if self.has_mask else ()),
            *(('bbox',) if self.has_bbox else ()))

  def split_size(self, split: str) -> int:
    if split not in self.splits:
      raise DataError(f'{self.name} has no split {split!r}; it has {sorted(self.splits)}')
    return self.splits[split]

  def nbytes(self, split: str) -> int:
    """Bytes of the split as the device pipeline stores it (uint8 images and masks, labels)."""
    h, w, c = self.image_shape
    per_example = h * w * c + (h * w if self.has_mask else 0) + 16 * self.has_bbox + 4
    if self.max_objects:  # labels and boxes of N objects, and the instance ids
      per_example += 20 * self.max_objects + (h * w if self.has_mask else 0)
    return self.split_size(split) * per_example


def list_datasets() -> list[str]:
  """Embedded datasets, then the public TFDS datasets cnnlab is tested with."""
  return [*EMBEDDED, *public.PUBLIC]


def default_data_dir() -> str:
  """$CNNLAB_DATA_DIR, else $TFDS_DATA_DIR, else ~/.cache/cnnlab/datasets."""
  for variable in ('CNNLAB_DATA_DIR', 'TFDS_DATA_DIR'):
    if os.environ.get(variable):
      return os.path.expanduser(os.environ[variable])
  return os.path.expanduser(os.path.join('~', '.cache', 'cnnlab', 'datasets'))


def resolve_data_dir(data_dir: str | None) -> str:
  return os.path.expanduser(str(data_dir)) if data_dir else default_data_dir()


def check_name(name: str) -> None:
  """Raises DataError listing the available names unless `name` is a dataset cnnlab can read."""
  if name in EMBEDDED or name in public.PUBLIC or public.is_tfds_name(name):
    return
  close = difflib.get_close_matches(name, list_datasets(), n=3)
  hint = f' Did you mean {" or ".join(map(repr, close))}?' if close else ''
  raise DataError(
      f'unknown dataset {name!r}.{hint}\n  embedded (offline): {", ".join(EMBEDDED)}\n'
      f'  public (TFDS, prepared with `cnnlab prepare`): {", ".join(public.PUBLIC)}\n'
      "  any other TFDS dataset with 'image' and 'label' features (tfds.list_builders()).")


def _check_split(name: str, split: str, splits) -> None:
  if split not in splits:
    raise DataError(f'{name} has no split {split!r}; it has {sorted(splits)}')


def embedded_builder(name: str, data_dir: str | None = None, **builder_kwargs) -> EmbeddedBuilder:
  """The builder of an embedded dataset, generated into `data_dir` if it is not there yet."""
  data_dir = resolve_data_dir(data_dir)
  try:
    builder = BUILDERS[name](data_dir=data_dir, file_format='array_record', **builder_kwargs)
  except TypeError as e:
    raise DataError(f'{name}: unsupported option in {builder_kwargs}: {e}') from None
  if not builder.is_prepared():
    # One process generates, the others wait and read (runs of a sweep, several jobs sharing a
    # data directory): a lock per dataset in the data directory.
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f'.{name}.lock'), 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      builder = BUILDERS[name](data_dir=data_dir, file_format='array_record', **builder_kwargs)
      if not builder.is_prepared():
        builder.download_and_prepare()
  _check_cache(builder)
  return builder


def _check_cache(builder: EmbeddedBuilder) -> None:
  """Refuses a cached copy written by other code or settings, rather than serving its batches."""
  where = builder.data_dir
  fix = f'Delete {where} and it will be generated again.'
  metadata = builder.info.metadata or {}
  if metadata.get('format_version') != FORMAT_VERSION:
    raise DataError(f'{builder.name} in {where} has format version '
                    f'{metadata.get("format_version")}, this code reads {FORMAT_VERSION}. {fix}')
  if metadata.get('params') != builder.params():
    raise DataError(f'{builder.name} in {where} was generated with {metadata.get("params")}, '
                    f'expected {builder.params()}. {fix}')
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise DataError(f'{builder.name} in {where} is not array_record. {fix}')
  stored = builder.info.features['image'].shape
  if tuple(stored) != tuple(builder.image_shape):
    raise DataError(f'{builder.name} in {where} stores images of shape {stored}, expected '
                    f'{builder.image_shape}. {fix}')


def load(name: str, split: str, *, data_dir: str | None = None, **builder_kwargs):
  """Random-access source of `name`/`split`: `len(src)`, `src[i]` -> dict of numpy arrays.

  Embedded datasets generate themselves on first use. builder_kwargs: the `shapes` / `synthetic`
  settings (`cnnlab.data.config`), or TFDS builder options (e.g. `config='160px-v2'`).
  """
  check_name(name)
  if name == 'synthetic':
    _check_split(name, split, synthetic.SPLITS)
    return synthetic.SyntheticSource(split, **builder_kwargs)
  if name in BUILDERS:
    builder = embedded_builder(name, data_dir, **builder_kwargs)
    _check_split(name, split, builder.info.splits)
    try:
      return builder.as_data_source(split)
    except Exception as e:
      raise DataError(f'cannot read {name}/{split} from {builder.data_dir}: {e}. Delete that '
                      'directory and it will be generated again.') from e
  return public.load(name, split, resolve_data_dir(data_dir), **builder_kwargs)


def prepare(name: str, data_dir: str | None = None, **kw) -> str:
  """Prepares `name` in `data_dir` (what `cnnlab prepare` runs); returns where it was written.

  Embedded datasets generate offline; public ones download through TFDS (network + TensorFlow).
  kw: builder settings, and `manual_dir` for datasets that need a manual download (imagenet2012).
  """
  check_name(name)
  if name == 'synthetic':
    return '(synthetic is generated on demand; nothing to prepare)'
  if name in BUILDERS:
    return str(embedded_builder(name, data_dir, **kw).data_dir)
  return public.prepare(name, resolve_data_dir(data_dir), **kw)


def info(name: str, *, data_dir: str | None = None, image_size: int | None = None,
         **builder_kwargs) -> DatasetInfo:
  """Classes, image shape, split sizes, train mean/std and extra targets of a dataset.

  image_size: side to which the pipelines resize variable-size (or any) images; see
  `cnnlab.data.sources.resize_center_crop`. Embedded datasets are generated if needed.
  """
  check_name(name)
  if name == 'synthetic':
    source = synthetic.SyntheticSource('train', **builder_kwargs)
    channels = source.image_shape[-1]
    return DatasetInfo(name=name, num_classes=source.num_classes,
                       image_shape=_sized(name, source.image_shape, image_size),
                       splits={s: len(source) for s in synthetic.SPLITS},
                       mean=(synthetic.MEAN,) * channels, std=(synthetic.STD,) * channels)
  if name in BUILDERS:
    builder = embedded_builder(name, data_dir, **builder_kwargs)
    if builder.HAS_MASK and image_size not in (None, builder.image_shape[0]):
      raise DataError(f'{name} has masks and boxes, which are not resized: set its resolution '
                      f'to {image_size} instead of image_size')
    metadata = builder.info.metadata
    return DatasetInfo(
        name=name, num_classes=builder.NUM_CLASSES,
        image_shape=_sized(name, builder.image_shape, image_size),
        splits={s: int(v.num_examples) for s, v in builder.info.splits.items()},
        mean=tuple(metadata['mean']), std=tuple(metadata['std']),
        has_mask=builder.HAS_MASK, has_bbox=builder.HAS_MASK and not builder.max_objects,
        num_mask_classes=builder.NUM_CLASSES + 1 if builder.HAS_MASK else 0,
        class_names=builder.class_names(), max_objects=builder.max_objects)
  data_dir = resolve_data_dir(data_dir)
  feats = public.features(name, data_dir, **builder_kwargs)
  splits = feats['splits']
  if not splits:  # under tfds.testing.mock_data TFDS knows no split sizes: ask the sources
    splits = {s: len(public.load(name, s, data_dir, **builder_kwargs))
              for s in ('train', public.PUBLIC.get(name, 'test'))}
  mean, std = public.train_stats(name, data_dir, 'train', **builder_kwargs)
  return DatasetInfo(name=name, num_classes=feats['num_classes'],
                     image_shape=_sized(name, feats['image_shape'], image_size),
                     splits=splits, mean=mean, std=std,
                     eval_split=public.PUBLIC.get(name, 'test'))


def _sized(name: str, shape, image_size: int | None) -> tuple[int, int, int]:
  height, width, channels = shape
  if image_size is not None:
    return (int(image_size), int(image_size), channels)
  if height is None or width is None:
    raise DataError(f'{name} has images of varying size; set config.data.image_size (pixels) '
                    'to resize them to a square')
  return (int(height), int(width), int(channels))
