"""The grain pipeline: batches read and decoded on the host, for data that does not fit a device.

Same stream as the device pipeline (`cnnlab.data.device`): global batch `step` holds the examples
at positions step % steps_per_epoch * B .. + B - 1 of epoch_permutation(seed, epoch). The
permutations are computed on the host CPU with the very function the device pipeline traces, so
both pipelines yield identical batches, and any step can be the first (resume without iterator
state). Process p of P reads rows p * B/P .. (p + 1) * B/P - 1 of every global batch, which
`jax.make_array_from_process_local_data` assembles into one global array on the batch sharding.

One grain element is one process-local batch: `MapDataset.source(rows).map(ReadBatch)`, so a
worker reads a whole batch with one `__getitems__` call. A pipeline covers at least `CHUNK_STEPS`
steps (whole epochs), after which the next one starts; worker start-up is amortised over it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterator

import grain
from absl import flags
import jax
import numpy as np

from cnnlab.data import device, registry, sources
from cnnlab.data.errors import DataError

CHUNK_STEPS = 2000  # minimum steps one grain pipeline (and its worker processes) serves


@functools.cache
def _cpu_permutation(seed: int, num_examples: int):
  fn = jax.jit(device.epoch_permutation, static_argnums=(0, 2))
  cpu = jax.devices('cpu')[0]
  return lambda epoch: np.asarray(fn(seed, jax.device_put(np.int32(epoch), cpu), num_examples))


def host_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """epoch_permutation(seed, epoch, N) computed on the host CPU: (N,) int32."""
  return _cpu_permutation(seed, num_examples)(epoch)


class ReadBatch:
  """Grain map: rows (b, 2) [example index, epoch or valid] -> dict of stacked numpy arrays."""

  def __init__(self, source, converter: sources.RecordConverter, extra: str):
    self.source = source
    self.converter = converter
    self.extra = extra  # 'epoch' for training batches, 'valid' for evaluation batches

  def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    indices = rows[:, 0]
    records = sources.read_records(self.source, indices, name=self.converter.info.name,
                                   split=self.converter.split)
    examples = [self.converter(r, int(i)) for r, i in zip(records, indices)]
    batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
    batch['index'] = indices.astype(np.int32)
    batch[self.extra] = rows[:, 1].astype(np.int32 if self.extra == 'epoch' else bool)
    return batch


@dataclasses.dataclass(frozen=True)
class GrainPipeline:
  """Host pipeline over a random-access source, yielding global batches sharded on the data axis."""

  name: str
  split: str
  info: registry.DatasetInfo
  source: object  # len(), __getitem__, __getitems__
  converter: sources.RecordConverter
  batch_size: int  # global batch
  seed: int
  shuffle: bool
  num_examples: int
  steps_per_epoch: int  # N // batch_size: the last partial batch of an epoch is dropped
  sharding_batch: jax.sharding.Sharding | None
  num_workers: int
  prefetch: int
  process_index: int
  process_count: int
  kind: str = 'grain'

  @classmethod
  def create(cls, name: str, split: str, *, batch_size: int, seed: int,
             sharding_batch: jax.sharding.Sharding | None, data_dir: str | None = None,
             num_workers: int = 0, prefetch: int = 2, shuffle: bool = True,
             process_index: int | None = None, process_count: int | None = None,
             image_size: int | None = None, **builder_kwargs) -> 'GrainPipeline':
    info = registry.info(name, data_dir=data_dir, image_size=image_size, **builder_kwargs)
    source = registry.load(name, split, data_dir=data_dir, **builder_kwargs)
    return cls.from_source(source, info, split, batch_size=batch_size, seed=seed,
                           sharding_batch=sharding_batch, num_workers=num_workers,
                           prefetch=prefetch, shuffle=shuffle, process_index=process_index,
                           process_count=process_count, image_size=image_size)

  @classmethod
  def from_source(cls, source, info: registry.DatasetInfo, split: str, *, batch_size: int,
                  seed: int, sharding_batch, num_workers: int = 0, prefetch: int = 2,
                  shuffle: bool = True, process_index: int | None = None,
                  process_count: int | None = None,
                  image_size: int | None = None) -> 'GrainPipeline':
    """A pipeline over any random-access source whose records `info` describes."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
      raise DataError(f'batch_size={batch_size} is not divisible by the {process_count} '
                      'processes that each read an equal slice of it')
    if not 0 <= process_index < process_count:
      raise DataError(f'process_index={process_index} outside [0, {process_count})')
    num_examples = len(source)
    return cls(name=info.name, split=split, info=info, source=source,
               converter=sources.RecordConverter(info, split, image_size),
               batch_size=batch_size, seed=seed, shuffle=shuffle, num_examples=num_examples,
               steps_per_epoch=num_examples // batch_size, sharding_batch=sharding_batch,
               num_workers=num_workers, prefetch=prefetch, process_index=process_index,
               process_count=process_count)

  @property
  def local_batch_size(self) -> int:
    return self.batch_size // self.process_count

  def _local(self, rows: np.ndarray) -> np.ndarray:
    """(steps, B, ...) global rows -> (steps, B / P, ...) rows of this process."""
    b = self.local_batch_size
    return rows[:, self.process_index * b:(self.process_index + 1) * b]

  def _train_rows(self, first_epoch: int, num_epochs: int) -> np.ndarray:
    """(num_epochs * steps_per_epoch, b, 2) int64 rows [index, epoch] of this process."""
    spe, batch = device.check_batch_size(self.batch_size, self.num_examples), self.batch_size
    chunks = []
    for epoch in range(first_epoch, first_epoch + num_epochs):
      order = (host_permutation(self.seed, epoch, self.num_examples) if self.shuffle
               else np.arange(self.num_examples))
      indices = self._local(order[:spe * batch].reshape(spe, batch))
      chunks.append(np.stack([indices, np.full_like(indices, epoch)], -1))
    return np.concatenate(chunks).astype(np.int64)

  def _grain(self, rows: np.ndarray, extra: str, to_device: bool) -> grain.IterDataset:
    ds = grain.MapDataset.source(rows).map(ReadBatch(self.source, self.converter, extra))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, self.prefetch),
                                              prefetch_buffer_size=max(1, self.prefetch)))
    if self.num_workers > 0:
      # Grain's worker start-up reads an absl flag, which fails unless flags were parsed (as
      # absl.app.run does); outside an absl app, accept the defaults as grain's own tests do.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
    if to_device:
      # A thread assembles global arrays ahead of the step, so host-to-device copies overlap it.
      ds = grain.experimental.ThreadPrefetchIterDataset(
          ds.map(self._to_global), prefetch_buffer_size=max(1, self.prefetch))
    return ds

  def _to_global(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    if self.process_count != jax.process_count():
      raise DataError(f'this pipeline simulates {self.process_count} processes but JAX runs '
                      f'{jax.process_count()}: use host_batches() to inspect simulated slices')
    if self.sharding_batch is None:  # no mesh: the default device
      return {key: jax.device_put(value) for key, value in local.items()}
    return {key: jax.make_array_from_process_local_data(
        self.sharding_batch, value, (value.shape[0] * self.process_count, *value.shape[1:]))
            for key, value in local.items()}

  def _train_stream(self, start_step: int, to_device: bool):
    spe = device.check_batch_size(self.batch_size, self.num_examples)
    epochs_per_chunk = max(1, math.ceil(CHUNK_STEPS / spe))
    epoch, skip = divmod(start_step, spe)
    while True:
      rows = self._train_rows(epoch, epochs_per_chunk)[skip:]
      yield from _closing(iter(self._grain(rows, 'epoch', to_device)))
      epoch, skip = epoch + epochs_per_chunk, 0

  def _eval_stream(self, to_device: bool):
    steps = math.ceil(self.num_examples / self.batch_size)
    positions = np.arange(steps * self.batch_size).reshape(steps, self.batch_size)
    rows = np.stack([np.minimum(positions, self.num_examples - 1),
                     positions < self.num_examples], -1)
    yield from _closing(iter(self._grain(self._local(rows).astype(np.int64), 'valid', to_device)))

  def host_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This process's (B / P)-row numpy slices of global batches start_step, start_step + 1, ..."""
    return self._train_stream(start_step, to_device=False)

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
    """Global batches start_step, start_step + 1, ... as jax.Arrays on `sharding_batch`, with the
    keys of `device_batch`: image, label, (mask, bbox), index, epoch."""
    return self._train_stream(start_step, to_device=True)

  def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
    """The whole split in stored order, padded to full batches, with 'valid' (B,) bool."""
    return self._eval_stream(to_device=True)


def _closing(iterator):
  """Yields from a grain iterator and stops its threads/workers when the consumer lets go."""
  try:
    yield from iterator
  finally:
    close = getattr(iterator, 'close', None)
    if close is not None:
      close()
