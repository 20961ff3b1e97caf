"""Every shipped experiment (and each model family) trains for a few steps end to end."""

import glob
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnnlab import config as config_lib
from cnnlab.train import loop
from cnnlab.train.logging import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_SHAPES = {'data.shapes.num_train': 64, 'data.shapes.num_test': 32}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('datasets'))


def run_few_steps(experiment, workdir, data_dir, overrides):
  config = config_lib.load(os.path.join(ROOT, 'experiments', f'{experiment}.py'))
  settings = {'data.data_dir': data_dir, 'log.progress': 'none', 'compilation_cache_dir': '',
              'train.num_steps': 2, 'train.batch_size': 16, 'train.log_every_steps': 1,
              'train.eval_batch_size': 16, 'log.tensorboard': False, **overrides}
  for key, value in settings.items():
    config_lib.set_value(config, key, value)
  summary = loop.train_and_evaluate(config, workdir)
  losses = [r['loss'] for r in read_metrics(workdir) if r['kind'] == 'train']
  assert len(losses) == 2 and np.isfinite(losses).all()
  assert 0.0 <= summary['final_eval']['accuracy'] <= 1.0
  return summary


EXPERIMENTS = {
    'quickstart': {},
    'simple_cnn_mnist5k': {},
    'resnet20_shapes': {**SMALL_SHAPES, 'data.shapes.resolution': 32},
    'googlenet_shapes': {**SMALL_SHAPES, 'data.shapes.resolution': 64},
    'cifar10_resnet18': {'data.name': 'synthetic', 'data.synthetic.num_examples': 32},
}


def test_every_experiment_is_covered():
  shipped = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, 'experiments', '*.py'))}
  special = {'base', 'imagenet_resnet50'} | {s for s in shipped if s.startswith('ablation')}
  assert shipped - special == set(EXPERIMENTS)


@pytest.mark.parametrize('experiment', sorted(EXPERIMENTS))
def test_experiment_trains(experiment, tmp_path, data_dir):
  run_few_steps(experiment, str(tmp_path), data_dir, EXPERIMENTS[experiment])


@pytest.mark.parametrize('model,overrides', [
    ('alexnet', {'data.shapes.resolution': 64}),
    ('vgg11_bn', {'data.shapes.resolution': 32, 'model.pool_size': 1, 'model.hidden': 64}),
    ('lenet5', {'data.shapes.resolution': 32}),
])
def test_other_families_train(model, overrides, tmp_path, data_dir):
  """The families no shipped experiment uses, on shapes (conv_stack's extra keys removed)."""
  config = config_lib.load(os.path.join(ROOT, 'experiments', 'resnet20_shapes.py'))
  with config.model.unlocked():
    config.model.name = model
    for key, value in overrides.items():
      if key.startswith('model.'):
        config.model[key[len('model.'):]] = value
  for key, value in {**SMALL_SHAPES, 'data.data_dir': data_dir, 'log.progress': 'none',
                     'compilation_cache_dir': '', 'train.num_steps': 2, 'train.batch_size': 16,
                     'log.tensorboard': False}.items():
    config_lib.set_value(config, key, value)
  for key, value in overrides.items():
    if not key.startswith('model.'):
      config_lib.set_value(config, key, value)
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(summary['final_eval']['loss'])


@pytest.fixture
def fixed_mock_getitems(monkeypatch):
  """TFDS 4.9's mock breaks batch reads; see tests/test_data_public.py."""
  from tensorflow_datasets.testing import mocking
  monkeypatch.setattr(mocking, '_getitems', lambda record_keys, generator, serialized=False:
                      [generator[k] for k in record_keys])


def test_imagenet_resnet50_step_on_mock_data(tmp_path, fixed_mock_getitems):
  """The ImageNet recipe (grain pipeline, bfloat16, ResNet-50) compiles and runs on mock records."""
  with tfds.testing.mock_data(num_examples=32):
    summary = run_few_steps('imagenet_resnet50', str(tmp_path), str(tmp_path / 'data'), {
        'data.image_size': 64, 'data.grain_workers': 0, 'data.augment.crop_padding': 4,
        'train.eval_every_steps': 2, 'checkpoint.every_steps': 0})
  assert summary['num_params'] == 25_557_032
