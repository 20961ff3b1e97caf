"""Public datasets read through TFDS: preparation, loading and their train-split statistics.

Preparing (downloading and writing array_record files) runs TFDS's own builders, which need the
network and TensorFlow (`pip install 'cnnlab[prepare]'`). Reading needs neither: `tfds.data_source`
decodes records with numpy/PIL. Loading never downloads: a dataset that is not prepared fails with
the `cnnlab prepare` command to run.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from cnnlab.data.errors import DataError

# The public datasets cnnlab is tested with, and their evaluation split. Any other TFDS dataset
# with an `image` and a `label` feature loads the same way.
PUBLIC = {
    'mnist': 'test',
    'fashion_mnist': 'test',
    'cifar10': 'test',
    'cifar100': 'test',
    'imagenette': 'validation',
    'imagenet2012': 'validation',
}
MANUAL = {
    'imagenet2012': 'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org)',
}
STATS_FILE = 'cnnlab_stats.json'  # written next to TFDS's dataset_info.json
STATS_MAX_EXAMPLES = 10_000  # mean/std are estimated on at most this many evenly spaced examples


def is_tfds_name(name: str) -> bool:
  return name in tfds.list_builders(with_community_datasets=False)


def builder(name: str, data_dir: str, **builder_kwargs) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder(name, data_dir=data_dir, **builder_kwargs)
  except (TypeError, ValueError) as e:
    raise DataError(f'cannot make the TFDS builder {name!r} with options {builder_kwargs}: {e}'
                    ) from None


def prepare_command(name: str, data_dir: str) -> str:
  return f'cnnlab prepare {name} --data-dir {data_dir}'


def not_prepared_message(name: str, data_dir: str) -> str:
  lines = [
      f'dataset {name!r} is not prepared in {data_dir}. Prepare it once (this needs the network '
      "and TensorFlow: pip install 'cnnlab[prepare]'), then reading works offline:",
      f'  {prepare_command(name, data_dir)}',
  ]
  if name in MANUAL:
    lines.append(f'{name} needs a manual download first: put {MANUAL[name]} in '
                 f'{os.path.join(data_dir, "downloads", "manual")}')
  return '\n'.join(lines)


def load(name: str, split: str, data_dir: str, **builder_kwargs):
  """The TFDS random-access data source of a prepared public dataset (never downloads)."""
  b = builder(name, data_dir, **builder_kwargs)
  if b.is_prepared() and split not in b.info.splits:
    raise DataError(f'{name} has no split {split!r}; it has {sorted(b.info.splits)}')
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            builder_kwargs=builder_kwargs or None)
  except Exception as e:  # TFDS's messages for these cases point at its internals.
    if not b.is_prepared():
      raise DataError(not_prepared_message(name, data_dir)) from None
    if b.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise DataError(
          f'{name} in {b.data_dir} is stored as {b.info.file_format.value}, which has no random '
          f'access; prepare an array_record copy in another directory:\n'
          f'  {prepare_command(name, "OTHER_DIR")}') from None
    raise DataError(f'cannot read {name}/{split} from {b.data_dir}: {e}\nIf the files are '
                    f'corrupt, delete that directory and run: {prepare_command(name, data_dir)}'
                    ) from e


def prepare(name: str, data_dir: str, *, manual_dir: str | None = None, **builder_kwargs) -> str:
  """Downloads and writes `name` as array_record under `data_dir`; returns the dataset directory."""
  if importlib.util.find_spec('tensorflow') is None:
    raise DataError(f"preparing {name!r} runs TFDS's builder, which needs TensorFlow: "
                    "pip install 'cnnlab[prepare]' (reading it afterwards does not)")
  b = builder(name, data_dir, file_format='array_record', **builder_kwargs)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  try:
    b.download_and_prepare(download_config=config)
  except Exception as e:
    hint = f' ({MANUAL[name]} must be in the manual directory)' if name in MANUAL else ''
    raise DataError(f'preparing {name!r} in {data_dir} failed{hint}: {type(e).__name__}: {e}'
                    ) from e
  if 'train' in b.info.splits:  # store the normalisation statistics with the dataset now
    train_stats(name, data_dir, 'train', **builder_kwargs)
  return str(b.data_dir)


def features(name: str, data_dir: str, **builder_kwargs) -> dict[str, Any]:
  """num_classes, the (possibly variable) image shape and the split sizes known to TFDS."""
  b = builder(name, data_dir, **builder_kwargs)
  feats = b.info.features
  for key in ('image', 'label'):
    if key not in feats:
      raise DataError(f"{name} has no {key!r} feature (it has {sorted(feats)}); cnnlab reads "
                      "datasets with 'image' and 'label'")
  return {
      'num_classes': int(feats['label'].num_classes),
      'image_shape': tuple(feats['image'].shape),
      'splits': {s: int(v.num_examples) for s, v in b.info.splits.items()},
      'dir': str(b.data_dir),
  }


def train_stats(name: str, data_dir: str, train_split: str, **builder_kwargs):
  """Per-channel (mean, std) on the 0..1 scale of the train split, cached in `STATS_FILE`."""
  b = builder(name, data_dir, **builder_kwargs)
  path = os.path.join(str(b.data_dir), STATS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    return tuple(cached['mean']), tuple(cached['std'])
  source = load(name, train_split, data_dir, **builder_kwargs)
  count = min(len(source), STATS_MAX_EXAMPLES)
  indices = np.linspace(0, len(source) - 1, count).astype(int)
  total = total_sq = pixels = 0
  for start in range(0, count, 1024):
    for record in source.__getitems__(indices[start:start + 1024].tolist()):
      x = np.asarray(record['image'], np.float64)
      x = x.reshape(-1, x.shape[-1] if x.ndim == 3 else 1) / 255.0
      total = total + x.sum(0)
      total_sq = total_sq + np.square(x).sum(0)
      pixels += x.shape[0]
  mean = total / pixels
  std = np.sqrt(np.maximum(total_sq / pixels - np.square(mean), 0.0))
  mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
  if b.is_prepared():  # not under tfds.testing.mock_data, whose statistics are noise
    try:
      with open(path, 'w') as f:
        json.dump({'mean': mean, 'std': std, 'examples': int(count)}, f)
    except OSError:
      pass  # a read-only data directory: recompute next time
  return mean, std
