"""`synthetic`: uniformly random images and labels of a configured shape, for benchmarks.

Nothing is stored. The device pipeline generates the split directly in accelerator memory with
`jax.random` (`device_arrays`); the host side (`SyntheticSource`) is a random-access source with
the data-source interface (`len`, `__getitem__`, `__getitems__`) whose example i is a pure
function of (dataset_seed, split, i), so the grain pipeline can be benchmarked on it too. The two
draw different pixels from the same distribution: only throughput is meant to be measured here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.data.errors import DataError

SPLITS = ('train', 'test')
# Mean and std of a uniform integer in 0..255, on the 0..1 scale.
MEAN = 127.5 / 255.0
STD = float(np.sqrt((256**2 - 1) / 12.0) / 255.0)


def check_params(image_shape, num_classes, num_examples) -> tuple[int, int, int]:
  shape = tuple(int(s) for s in image_shape)
  if len(shape) != 3 or min(shape) < 1:
    raise DataError(f'synthetic image_shape must be (height, width, channels), got {image_shape!r}')
  if num_classes < 1 or num_examples < 1:
    raise DataError(f'synthetic needs num_classes >= 1 and num_examples >= 1, got '
                    f'num_classes={num_classes}, num_examples={num_examples}')
  return shape  # type: ignore[return-value]


class SyntheticSource:
  """Random-access source of `num_examples` random examples; picklable for grain workers."""

  def __init__(self, split: str, *, image_shape=(224, 224, 3), num_classes=1000,
               num_examples=1024, dataset_seed=0):
    self.split = split
    self.image_shape = check_params(image_shape, num_classes, num_examples)
    self.num_classes = int(num_classes)
    self.num_examples = int(num_examples)
    self.dataset_seed = int(dataset_seed)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self.num_examples:
      raise IndexError(f'synthetic/{self.split} has {self.num_examples} examples, got {index}')
    rng = np.random.default_rng([self.dataset_seed, SPLITS.index(self.split), int(index)])
    return {
        'image': rng.integers(0, 256, self.image_shape, dtype=np.uint8),
        'label': np.int64(rng.integers(self.num_classes)),
    }

  def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
    return [self[int(i)] for i in indices]


def device_arrays(split: str, sharding: jax.sharding.Sharding, *, image_shape=(224, 224, 3),
                  num_classes=1000, num_examples=1024, dataset_seed=0) -> dict[str, jax.Array]:
  """The whole split generated on the devices of `sharding`: image (N, H, W, C) uint8, label (N,)
  int32."""
  shape = check_params(image_shape, num_classes, num_examples)

  def generate(key):
    image_key, label_key = jax.random.split(key)
    images = jax.random.randint(image_key, (num_examples, *shape), 0, 256, jnp.int32)
    labels = jax.random.randint(label_key, (num_examples,), 0, num_classes, jnp.int32)
    return {'image': images.astype(jnp.uint8), 'label': labels}

  key = jax.random.fold_in(jax.random.PRNGKey(dataset_seed), SPLITS.index(split))
  out_shardings = {'image': sharding, 'label': sharding}
  return jax.jit(generate, out_shardings=out_shardings)(key)
