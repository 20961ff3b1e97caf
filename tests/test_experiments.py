"""Every shipped experiment, whatever its task, trains end to end on 4 devices
(train_and_evaluate: the step, an evaluation, a checkpoint, summary.json; on TFDS's mock records
for a public dataset this machine cannot download), and a representative
few of them (EQUIVALENT) take the same step on 4 devices as on one.

The one-device step and the comparison are `bench/parallel_equivalence.py`'s (see
tests/test_parallel_equivalence.py for the bounds and why Adam recipes are compared under SGD).
The comparison covers both strategies, a ResNet on CIFAR-sized inputs, a dense per-pixel output
and a two-headed one; the others train on 4 devices without it: their rounding differences
(float32's summation order, one device or four) are amplified by batch norms over 1x1 and 2x2
maps of 8 examples (GoogLeNet's and ResNet-18's last stages at 32x32) past the per-tensor bound,
which is there to catch a wrong gradient, not rounding.
"""

import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import cnnlab
from cnnlab import config as config_lib, data, models
from cnnlab.sweeps import plan as sweep_plan
from cnnlab.train import checks, loop, transfer
from cnnlab.workdir import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'bench'))

import parallel_equivalence as equivalence  # noqa: E402

SMALL_SHAPES = ['data.shapes.num_train=64', 'data.shapes.num_test=32']
ON_SHAPES = ["data.name='shapes'", *SMALL_SHAPES, "data.train_split='train'",
             "data.eval_split='test'", "data.pipeline='device'", 'data.image_size=None',
             'model.num_classes=None']
# Experiment -> (overrides, strategy of the 4-device run). Small batches and data; the Adam
# recipes of EQUIVALENT compared under SGD.
EXPERIMENTS = {
    'quickstart': (['train.batch_size=16'], 'jit'),
    'simple_cnn_mnist5k': (['train.batch_size=32'], 'pmap'),
    'resnet20_shapes': (['train.batch_size=16', *SMALL_SHAPES, 'data.shapes.resolution=32'], 'pmap'),
    'googlenet_shapes': (['train.batch_size=8', *SMALL_SHAPES, 'data.shapes.resolution=32'],
                         'jit'),
    'cifar10_resnet18': (['train.batch_size=8', *ON_SHAPES, 'data.shapes.resolution=32'], 'pmap'),
    # As shipped (Grain host pipeline, bfloat16), on TFDS's mock records (ON_MOCK_DATA).
    'imagenet_resnet50': (['train.batch_size=16', 'data.image_size=32', 'data.grain_workers=0',
                           'data.augment.crop_padding=4'], 'jit'),
    'ablation_kernel_stride_pool': (['train.batch_size=32'], 'pmap'),
    'ablation_kernel_stride_pool_shapes': (['train.batch_size=16', *SMALL_SHAPES], 'jit'),
    'segment_shapes': (['train.batch_size=8', *SMALL_SHAPES, 'data.shapes.resolution=16',
                        'model.features=(8, 16)', "optim.name='sgd'"], 'jit'),
    'localize_shapes': (['train.batch_size=8', *SMALL_SHAPES, 'data.shapes.resolution=16',
                         "optim.name='sgd'"], 'pmap'),
    'autoencoder_mnist5k': (['train.batch_size=16'], 'jit'),
    'embeddings_mnist5k': (['train.batch_size=16'], 'pmap'),
    'transfer_digits': (['train.batch_size=16'], 'jit'),
    'pretrain_shapes_resnet18': (['train.batch_size=8', *SMALL_SHAPES], 'jit'),
    'transfer_shapes_resnet18': (['train.batch_size=8', *SMALL_SHAPES], 'jit'),
    # pmap: the detector's samples under a per-device key, COCO records all-gathered.
    'detect_shapes': (['train.batch_size=8', *SMALL_SHAPES], 'pmap'),
}
# Experiments whose step on 4 devices is compared with the same step on one (see the docstring).
EQUIVALENT = ('quickstart', 'cifar10_resnet18', 'segment_shapes', 'localize_shapes')
# Experiments of public datasets this machine cannot download: trained on TFDS's mock records.
ON_MOCK_DATA = ('imagenet_resnet50',)
# Transfer experiments -> (the experiment whose run their sweep starts from, overrides of both).
TRANSFERS = {
    'embeddings_mnist5k': ('autoencoder_mnist5k', []),
    'transfer_digits': ('quickstart', []),
    'transfer_shapes_resnet18': ('pretrain_shapes_resnet18', SMALL_SHAPES),
}


@pytest.fixture(scope='module')
def data_dir(shared_data_dir):
  return shared_data_dir


def test_every_shipped_experiment_is_covered():
  shipped = {name[:-3] for name in os.listdir(os.path.join(ROOT, 'experiments'))
             if name.endswith('.py')}
  assert shipped == set(EXPERIMENTS)


def overrides_of(experiment, data_dir):
  overrides, strategy = EXPERIMENTS[experiment]
  return [*overrides, f"data.data_dir='{data_dir}'", 'train.eval_batch_size=16',
          'log.tensorboard=False'], strategy


def train_on_4_devices(experiment, workdir, data_dir):
  """train_and_evaluate on 4 devices with the experiment's strategy: (summary, its train record)."""
  overrides, strategy = overrides_of(experiment, data_dir)
  config = equivalence.load_config(experiment, overrides, strategy=strategy, devices=4)
  summary = loop.train_and_evaluate(config, str(workdir))
  [record] = [r for r in read_metrics(str(workdir)) if r['kind'] == 'train']
  headline = summary['headline']['metric']  # the task's: accuracy, miou, localized, psnr, AP50
  assert headline in summary['final_eval'] and np.isfinite(list(summary['final_eval'].values())).all()
  assert np.isfinite(record['loss']) and np.isfinite(record['grad_norm'])
  return summary, record


@pytest.mark.parametrize('experiment', sorted(set(EXPERIMENTS) - set(EQUIVALENT) - set(ON_MOCK_DATA)))
def test_experiment_trains_on_4_devices(experiment, tmp_path, data_dir):
  train_on_4_devices(experiment, tmp_path, data_dir)
  assert cnnlab.load_run(str(tmp_path)).variables['params']


@pytest.fixture
def fixed_mock_getitems(monkeypatch):
  """TFDS 4.9's mock breaks batch reads; see tests/test_data_public.py."""
  from tensorflow_datasets.testing import mocking
  monkeypatch.setattr(mocking, '_getitems', lambda record_keys, generator, serialized=False:
                      [generator[k] for k in record_keys])


@pytest.mark.parametrize('experiment', ON_MOCK_DATA)
def test_experiment_trains_on_4_devices_on_mock_data(experiment, tmp_path, fixed_mock_getitems):
  """The recipe as shipped (for ImageNet: the Grain host pipeline, bfloat16, ResNet-50) on mock
  records of its dataset."""
  with tfds.testing.mock_data(num_examples=32):
    summary, _ = train_on_4_devices(experiment, tmp_path, str(tmp_path / 'data'))
  assert summary['num_params'] == {'imagenet_resnet50': 25_557_032}[experiment]
  assert cnnlab.load_run(str(tmp_path)).variables['params']


@pytest.mark.parametrize('experiment', EQUIVALENT)
def test_experiment_trains_on_4_devices_as_on_one(experiment, tmp_path, data_dir):
  one_state, one = equivalence.one_step(
      equivalence.load_config(experiment, overrides_of(experiment, data_dir)[0]))
  _, record = train_on_4_devices(experiment, tmp_path, data_dir)
  assert record['loss'] == pytest.approx(one['loss'], rel=1e-5)
  assert record['grad_norm'] == pytest.approx(one['grad_norm'], rel=1e-4)
  run = cnnlab.load_run(str(tmp_path))
  for tree in ('params', 'batch_stats'):
    worst, path = equivalence.worst_difference(run.variables.get(tree, {}),
                                               getattr(one_state, tree))
    assert worst < 1e-2, f'{tree} {path}: {worst:.2e} of its largest value'


def abstract_variables(experiment, overrides, data_dir):
  """(model, input (H, W, C), its {'params', 'batch_stats'} path -> shape) of an experiment's
  get_config(), abstractly."""
  config = config_lib.load(os.path.join(ROOT, 'experiments', f'{experiment}.py'),
                           [*overrides, f"data.data_dir='{data_dir}'"])
  info = data.info(config.data.name, data_dir=data_dir, image_size=config.data.image_size,
                   **data.builder_kwargs(config.data))
  model = models.from_config(config, info.num_classes)
  return model, info.image_shape, transfer.variable_shapes(model, info.image_shape)


@pytest.mark.parametrize('experiment', sorted(TRANSFERS))
def test_transfer_sweeps_take_every_tensor_but_the_head_from_their_source(experiment, data_dir):
  """The sweeps' transfer points need their source run, so the runs above train get_config()
  from scratch. Here every point is checked against the source experiment's model, abstractly:
  its freeze, lr_multipliers and init_exclude patterns name the model's tensors (as the run
  checks them), init_from copies every tensor but the head's (same path and shape, not
  excluded), so nothing meant to transfer silently starts afresh, and a probe trains the head
  alone."""
  source_name, overrides = TRANSFERS[experiment]
  *_, source = abstract_variables(source_name, overrides, data_dir)
  model, image_shape, target = abstract_variables(experiment, overrides, data_dir)
  points = sweep_plan.load_sweep(os.path.join(ROOT, 'experiments', f'{experiment}.py'))
  transferred = [p for p in points if p.get('transfer.init_from')]
  assert transferred and len(transferred) < len(points)  # and some from scratch, to compare
  for point in points:
    args = [*overrides, *(f'{k}={sweep_plan.literal(k, v)}' for k, v in point.items())]
    config = config_lib.load(os.path.join(ROOT, 'experiments', f'{experiment}.py'), args)
    checks.check_parameter_keys(config, model, image_shape)
    if not config.transfer.init_from:
      continue
    for collection in ('params', 'batch_stats'):
      for path, shape in target[collection].items():
        copied = (source[collection].get(path) == shape
                  and not transfer.matches_any(config.transfer.init_exclude, path))
        assert copied != transfer.matches('head', path), (point, collection, path)
    frozen = [p for p in target['params'] if transfer.matches_any(config.optim.freeze, p)]
    assert not frozen or set(target['params']) - set(frozen) == {'head/kernel', 'head/bias'}


@pytest.mark.parametrize('name', config_lib.OPTIMIZERS)
def test_every_optimizer_takes_a_step(name, tmp_path, data_dir):
  """The optimizers the shipped recipes use (AdamW: GoogLeNet; Adam: simple_cnn) and the rest,
  end to end on a tiny model: finite, and the loss goes down."""
  config = config_lib.load(os.path.join(ROOT, 'experiments', 'quickstart.py'), [
      'model.filters=(8, 16)', 'model.kernel_size=3', 'model.stride=1', "model.pool='max'",
      "data.name='digits'", f"data.data_dir='{data_dir}'", 'data.augment.rotate=0.0',
      'data.augment.scale=0.0',
      'train.batch_size=32', 'train.num_steps=12', 'train.log_every_steps=1',
      f"optim.name='{name}'", 'optim.learning_rate=0.01' if name != 'sgd' else 'optim.learning_rate=0.1',
      "optim.schedule='constant'", 'optim.weight_decay=0.0001', "log.progress='none'",
      'log.tensorboard=False', "compilation_cache_dir=''", 'parallel.num_devices=1'])
  loop.train_and_evaluate(config, str(tmp_path))
  losses = [r['loss'] for r in read_metrics(str(tmp_path)) if r['kind'] == 'train']
  assert np.isfinite(losses).all() and np.mean(losses[-3:]) < np.mean(losses[:3])
