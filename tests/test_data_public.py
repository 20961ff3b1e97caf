"""Public TFDS datasets, loaded offline through `tfds.testing.mock_data` (no download, no TF)."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec as P

import cnnlab.data as data

N = 24  # mock examples per split


@pytest.fixture(autouse=True)
def fixed_mock_getitems(monkeypatch):
  """TFDS 4.9's mock sets `__getitems__` on a MagicMock instance as a partial of a function that
  expects `self` first, so batch reads fail under `mock_data`; give it the function it meant."""
  from tensorflow_datasets.testing import mocking
  monkeypatch.setattr(mocking, '_getitems',
                      lambda record_keys, generator, serialized=False:
                      [generator[k] for k in record_keys])


@pytest.fixture(scope='module')
def shardings():
  mesh = jax.make_mesh((len(jax.devices()),), ('data',))
  return NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))


@pytest.mark.parametrize('name, classes, image_size, shape', [
    ('mnist', 10, None, (28, 28, 1)),
    ('fashion_mnist', 10, None, (28, 28, 1)),
    ('cifar10', 10, None, (32, 32, 3)),
    ('cifar100', 100, None, (32, 32, 3)),
    ('imagenette', 10, 24, (24, 24, 3)),
    ('imagenet2012', 1000, 24, (24, 24, 3)),
])
def test_public_dataset_info_and_examples(name, classes, image_size, shape, tmp_path):
  with tfds.testing.mock_data(num_examples=N):
    info = data.info(name, data_dir=str(tmp_path), image_size=image_size)
    assert info.num_classes == classes and info.image_shape == shape
    assert info.splits == {'train': N, info.eval_split: N}
    assert len(info.mean) == shape[-1] and all(0 < s for s in info.std)
    source = data.load(name, info.eval_split, data_dir=str(tmp_path))
    assert len(source) == N
    arrays = data.sources.read_split(info, info.eval_split, source, image_size=image_size)
  assert arrays['image'].shape == (N, *shape) and arrays['image'].dtype == np.uint8
  assert arrays['label'].dtype == np.int32 and 0 <= arrays['label'].min()
  assert arrays['label'].max() < classes


def test_variable_size_images_need_an_image_size(tmp_path):
  with tfds.testing.mock_data(num_examples=N):
    with pytest.raises(data.DataError, match='varying size; set config.data.image_size'):
      data.info('imagenette', data_dir=str(tmp_path))


def test_public_dataset_through_both_pipelines(tmp_path, shardings):
  replicated, batch_sharding = shardings
  with tfds.testing.mock_data(num_examples=N):
    dev = data.DevicePipeline.create('cifar10', 'train', batch_size=8, seed=0,
                                     sharding_replicated=replicated, sharding_batch=batch_sharding,
                                     data_dir=str(tmp_path))
    g = data.GrainPipeline.create('cifar10', 'train', batch_size=8, seed=0,
                                  sharding_batch=batch_sharding, data_dir=str(tmp_path))
    grain_batch = next(g.iterate(2))
  device_batch = dev.batch(2)
  assert device_batch['image'].shape == (8, 32, 32, 3)
  np.testing.assert_array_equal(np.asarray(grain_batch['index']), np.asarray(device_batch['index']))
  assert sorted(grain_batch) == sorted(device_batch)
  data.check_batch(device_batch, image_shape=(32, 32, 3), num_classes=10)


def test_resize_center_crop_keeps_the_middle():
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, 20:60] = 200  # the central square
  out = data.sources.resize_center_crop(image, 20)
  assert out.shape == (20, 20, 3)
  assert (out[:, 1:-1] == 200).all()
  assert (out[:, [0, -1]] > 150).all()  # antialiasing blends a little black into the edge columns
  gray = data.sources.resize_center_crop(np.zeros((30, 20, 1), np.uint8), 10)
  assert gray.shape == (10, 10, 1)
