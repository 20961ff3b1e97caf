"""`make_pipeline`: the config's choice between the device and the grain pipeline."""

from __future__ import annotations

import ml_collections
import jax

from cnnlab.data import config as data_config
from cnnlab.data import registry
from cnnlab.data.device import DevicePipeline
from cnnlab.data.errors import DataError
from cnnlab.data.host import GrainPipeline

# `pipeline='auto'` keeps a split on the device when its uint8 arrays take at most this many bytes
# (per device: the split is replicated). 2 GiB holds CIFAR (150 MiB) or ImageNet at 64 px (15 GiB
# does not); the rest goes through grain.
DEVICE_BUDGET_BYTES = 2 * 1024**3
PIPELINES = ('device', 'grain', 'auto')


def choose(config_data: ml_collections.ConfigDict, split: str) -> str:
  """'device' or 'grain' for `config_data.pipeline` and the split's size."""
  kind = config_data.pipeline
  if kind not in PIPELINES:
    raise DataError(f'config.data.pipeline must be one of {PIPELINES}, got {kind!r}')
  if kind != 'auto':
    return kind
  info = registry.info(config_data.name, data_dir=config_data.data_dir,
                       image_size=config_data.image_size, **data_config.builder_kwargs(config_data))
  return 'device' if info.nbytes(split) <= DEVICE_BUDGET_BYTES else 'grain'


def make_pipeline(config_data: ml_collections.ConfigDict, *, split: str, batch_size: int, seed: int,
                  sharding_replicated: jax.sharding.Sharding,
                  sharding_batch: jax.sharding.Sharding,
                  shuffle: bool = True, examples_per_class: int = 0) -> DevicePipeline | GrainPipeline:
  """The pipeline `config.data` selects for `split`. Both have `.kind`, `.info`,
  `.steps_per_epoch`, `.iterate(start_step)` and `.eval_batches()`; a device pipeline also has
  `.arrays` and `.batch_fn()` for drawing batches inside the jitted step. `examples_per_class`
  > 0 keeps the first that many examples of each class (device pipeline only)."""
  common = dict(batch_size=batch_size, seed=seed, sharding_batch=sharding_batch,
                data_dir=config_data.data_dir, shuffle=shuffle,
                image_size=config_data.image_size, **data_config.builder_kwargs(config_data))
  if choose(config_data, split) == 'device':
    return DevicePipeline.create(config_data.name, split, sharding_replicated=sharding_replicated,
                                 examples_per_class=examples_per_class, **common)
  if examples_per_class:
    raise DataError(f'data.examples_per_class={examples_per_class} needs the device pipeline; '
                    f'{config_data.name}/{split} goes through grain (data.pipeline)')
  return GrainPipeline.create(config_data.name, split, num_workers=config_data.grain_workers,
                              prefetch=config_data.grain_prefetch, **common)
