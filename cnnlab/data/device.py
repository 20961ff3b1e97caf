"""The device pipeline: the whole split in accelerator memory, batches gathered inside the step.

The split is placed once (uint8, replicated on every device); `device_batch` is a pure, jittable
function of (arrays, step), so the train step draws its own batch with no host work and no
iterator state: the batch at step k is the same whether a run started at 0 or resumed at k.

Order: epoch e = step // steps_per_epoch visits the examples in the permutation drawn from
fold_in(PRNGKey(seed), e); the last N % batch_size of each permutation are dropped. The grain
pipeline (`cnnlab.data.host`) follows the same order, so the two yield identical batches.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.data import registry, sources, synthetic
from cnnlab.data.errors import DataError


def epoch_permutation(seed: int, epoch, num_examples: int) -> jax.Array:
  """(N,) int32: the order in which epoch `epoch` (int or traced scalar) visits the examples."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
  return jax.random.permutation(key, num_examples).astype(jnp.int32)


def batch_indices(step, *, seed: int, batch_size: int, num_examples: int, shuffle: bool = True):
  """(B,) int32 example indices of training step `step`, and the step's epoch (int32 scalar)."""
  steps_per_epoch = check_batch_size(batch_size, num_examples)
  step = jnp.asarray(step, jnp.int32)
  epoch = step // steps_per_epoch
  start = (step % steps_per_epoch) * batch_size
  if shuffle:
    order = epoch_permutation(seed, epoch, num_examples)
    indices = jax.lax.dynamic_slice(order, (start,), (batch_size,))
  else:
    indices = start + jnp.arange(batch_size, dtype=jnp.int32)
  return indices, epoch


def device_batch(arrays: dict[str, jax.Array], step, *, seed: int, batch_size: int,
                 num_examples: int, shuffle: bool = True,
                 sharding: jax.sharding.Sharding | None = None) -> dict[str, jax.Array]:
  """Batch `step` of the training stream. Pure and jittable; `step` may be a traced int32.

  arrays: 'image' (N, H, W, C) uint8, 'label' (N,) int32, optional 'mask' (N, H, W), 'bbox' (N, 4),
  or any other per-example arrays (the multi-object keys). Returns the same keys with B =
  batch_size rows (image stays uint8), plus 'index' (B,) int32, the examples' positions in the
  split, and 'epoch' (B,) int32 (used by the alternating flip).
  sharding: if given, every output is constrained to it (the mesh's batch sharding).
  """
  indices, epoch = batch_indices(step, seed=seed, batch_size=batch_size,
                                 num_examples=num_examples, shuffle=shuffle)
  batch = {key: gather(value, indices, sharding) for key, value in arrays.items()}
  batch['index'] = indices
  batch['epoch'] = jnp.full((batch_size,), epoch, jnp.int32)
  if sharding is not None:
    batch = constrain(batch, sharding)
  return batch


def _explicit(sharding) -> bool:
  mesh = getattr(sharding, 'mesh', None)
  return mesh is not None and any(
      t == jax.sharding.AxisType.Explicit for t in getattr(mesh, 'axis_types', ()))


def constrain(tree, sharding: jax.sharding.Sharding):
  """Places a pytree on `sharding` inside jit, for meshes with Explicit or Auto axes alike."""
  if _explicit(sharding):
    return jax.sharding.reshard(tree, sharding)
  return jax.lax.with_sharding_constraint(tree, sharding)


def first_per_class(arrays: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
  """The first `n` examples of each class (fewer where a class has fewer), in stored order."""
  labels = arrays['label']
  rank = np.zeros_like(labels)
  for k in np.unique(labels):
    rank[labels == k] = np.arange(np.sum(labels == k))
  keep = rank < n
  return {key: value[keep] for key, value in arrays.items()}


def like_batch(x: jax.Array, batch_array: jax.Array) -> jax.Array:
  """Gives per-example values x (B, ...) the batch-axis sharding of `batch_array` (B, ...).

  Under explicit sharding, random per-example parameters are drawn replicated while the batch is
  split over the data axis, and vmap / elementwise ops refuse the mix; elsewhere a no-op.
  """
  sharding = jax.typeof(batch_array).sharding
  spec = getattr(sharding, 'spec', ())
  if not _explicit(sharding) or len(spec) == 0 or spec[0] is None:
    return x
  return jax.sharding.reshard(
      x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(spec[0])))


def gather(value: jax.Array, indices: jax.Array, sharding=None) -> jax.Array:
  """value[indices] along axis 0, the rows landing on `sharding` (each device gathers its own)."""
  if sharding is None:
    return jnp.take(value, indices, axis=0)
  if _explicit(sharding):  # explicit-sharding mode asks for the gather's output sharding
    return value.at[constrain(indices, sharding)].get(out_sharding=sharding)
  return constrain(jnp.take(value, indices, axis=0), sharding)


def eval_batch(arrays: dict[str, jax.Array], start, *, batch_size: int, num_examples: int,
               sharding: jax.sharding.Sharding | None = None) -> dict[str, jax.Array]:
  """Examples start .. start + B - 1 in stored order; rows past the end repeat the last example
  and have 'valid' False (B,) bool, so every evaluation batch has one shape (one compilation)."""
  positions = start + jnp.arange(batch_size, dtype=jnp.int32)
  indices = jnp.minimum(positions, num_examples - 1)
  batch = {key: gather(value, indices, sharding) for key, value in arrays.items()}
  batch['index'] = indices
  batch['valid'] = positions < num_examples
  if sharding is not None:
    batch = constrain(batch, sharding)
  return batch


def check_batch_size(batch_size: int, num_examples: int) -> int:
  """steps_per_epoch = N // batch_size; DataError if a split cannot fill one batch."""
  if batch_size < 1 or batch_size > num_examples:
    raise DataError(f'batch_size={batch_size} does not fit a split of {num_examples} examples '
                    '(need 1 <= batch_size <= examples)')
  return num_examples // batch_size


def place(array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """Host array -> global jax.Array with `sharding` (every process holds the same full array)."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


@dataclasses.dataclass(frozen=True)
class DevicePipeline:
  """A split resident on the devices, and the static facts `device_batch` needs."""

  name: str
  split: str
  info: registry.DatasetInfo
  arrays: dict[str, jax.Array]  # placed once with sharding_replicated
  batch_size: int  # global batch
  seed: int
  shuffle: bool
  num_examples: int
  steps_per_epoch: int  # N // batch_size: the last partial batch of an epoch is dropped
  sharding_batch: jax.sharding.Sharding
  kind: str = 'device'

  @classmethod
  def create(cls, name: str, split: str, *, batch_size: int, seed: int,
             sharding_replicated: jax.sharding.Sharding, sharding_batch: jax.sharding.Sharding,
             data_dir: str | None = None, shuffle: bool = True, image_size: int | None = None,
             examples_per_class: int = 0, **builder_kwargs) -> 'DevicePipeline':
    info = registry.info(name, data_dir=data_dir, image_size=image_size, **builder_kwargs)
    if name == 'synthetic':  # generated on the device, never on the host
      arrays = synthetic.device_arrays(split, sharding_replicated, **builder_kwargs)
    else:
      source = registry.load(name, split, data_dir=data_dir, **builder_kwargs)
      host = sources.read_split(info, split, source, image_size=image_size)
      if examples_per_class:
        if 'label' not in host:
          raise DataError(f'examples_per_class={examples_per_class} needs one label per example; '
                          f'{name} holds up to {info.max_objects} objects per image')
        host = first_per_class(host, examples_per_class)
      arrays = {key: place(value, sharding_replicated) for key, value in host.items()}
    num_examples = int(arrays['image'].shape[0])
    return cls(name=name, split=split, info=info, arrays=arrays, batch_size=batch_size,
               seed=seed, shuffle=shuffle, num_examples=num_examples,
               steps_per_epoch=num_examples // batch_size, sharding_batch=sharding_batch)

  def batch_fn(self):
    """`step -> batch`, closed over the static settings: call it inside the jitted train step."""
    return functools.partial(device_batch, seed=self.seed, batch_size=self.batch_size,
                             num_examples=self.num_examples, shuffle=self.shuffle,
                             sharding=self.sharding_batch)

  @functools.cached_property
  def _jitted_batch(self):
    return jax.jit(lambda arrays, step: self.batch_fn()(arrays, step))

  def batch(self, step: int) -> dict[str, jax.Array]:
    """Batch `step`, computed on the devices (for loops that do not fuse it into their step)."""
    return self._jitted_batch(self.arrays, jnp.int32(step))

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
    """Batches start_step, start_step + 1, ... (the same interface as the grain pipeline)."""
    step = start_step
    while True:
      yield self.batch(step)
      step += 1

  @functools.cached_property
  def _jitted_eval_batch(self):
    return jax.jit(functools.partial(eval_batch, batch_size=self.batch_size,
                                     num_examples=self.num_examples,
                                     sharding=self.sharding_batch))

  def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
    """The whole split in stored order, padded to full batches, with 'valid' (B,) bool."""
    for start in range(0, self.num_examples, self.batch_size):
      yield self._jitted_eval_batch(self.arrays, jnp.int32(start))
