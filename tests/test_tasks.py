"""The task seam: each task's metrics against an independent computation (scikit-learn, numpy,
torch, torchvision), over whole splits that do not divide by the batch size and on several
devices; predictions that agree with the evaluation; the bad inputs a task refuses."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, jaccard_score

import cnnlab
from cnnlab import cli, config as config_lib, data, ops, tasks
from cnnlab.layers import as_logits
from cnnlab.models import registry
from cnnlab.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, 'experiments', 'quickstart.py')
# 30 test images: the evaluation batch of 8 leaves a padded last batch.
SHAPES = dict(resolution=16, num_classes=3, num_train=64, num_test=30, dataset_seed=2)


class TinySeg(nn.Module):
  num_classes: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return as_logits(nn.Conv(self.num_classes, (1, 1))(x))


class TinyLoc(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x)).mean((1, 2))
    centre, size = jnp.split(nn.sigmoid(nn.Dense(4)(x)), 2, axis=-1)
    box = jnp.clip(jnp.concatenate([centre - size / 2, centre + size / 2], -1), 0.0, 1.0)
    return {'logits': as_logits(nn.Dense(self.num_classes)(x)), 'box': as_logits(box)}


class TinyAE(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return as_logits(nn.Conv(x.shape[-1], (3, 3))(nn.relu(nn.Conv(8, (3, 3))(x))))


@pytest.fixture(scope='module', autouse=True)
def tiny_models():
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(registry, '_REGISTRY', dict(registry._REGISTRY))
    registry.register('tiny_seg', input_shape=(16, 16, 3), num_classes=4, task='segmentation')(TinySeg)
    registry.register('tiny_loc', input_shape=(16, 16, 3), num_classes=3, task='localization')(TinyLoc)
    registry.register('tiny_ae', input_shape=(16, 16, 3), task='reconstruction')(TinyAE)
    yield


def shapes_config(data_dir, task, model, *overrides):
  """base config: `task` with `model` on 16x16 shapes, two steps; `overrides` as 'key=value'."""
  from cnnlab.configs import base
  config = base.get_config()
  args = [f"task.name='{task}'", f"model.name='{model}'", "data.name='shapes'",
          *(f'data.shapes.{k}={v}' for k, v in SHAPES.items()), f"data.data_dir='{data_dir}'",
          'train.batch_size=16', 'train.eval_batch_size=8', 'train.num_steps=2',
          'train.log_every_steps=1', 'optim.learning_rate=0.01', "log.progress='none'",
          'log.tensorboard=False', "compilation_cache_dir=''", *overrides]
  for arg in args:
    key, _, value = arg.partition('=')
    config_lib.set_value(config, key, config_lib.parse_value(value))
  return config


def read_test_split(data_dir):
  source = data.load('shapes', 'test', data_dir=data_dir, **SHAPES)
  examples = [source[i] for i in range(len(source))]
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in ('image', 'label', 'mask', 'bbox')}


def evaluate(config):
  """(metrics, details, the state) of a fresh model over the whole evaluation split."""
  run = loop.setup(config)
  state = run.par.place_state(run.initial_state())
  return (*run.evaluate(run.compile_eval(state), state), run, state)


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---- metrics against independent computations ----

def test_segmentation_metrics_are_sklearns_over_a_padded_split_on_four_devices(shared_data_dir):
  config = shapes_config(shared_data_dir, 'segmentation', 'tiny_seg', 'parallel.num_devices=4')
  metrics, details, run, state = evaluate(config)
  split = read_test_split(shared_data_dir)
  images = data.augment.normalize(split['image'], run.settings.mean, run.settings.std)
  logits = np.asarray(run.model.apply(jax.device_get(state.variables), images), np.float64)
  true, predicted = split['mask'].ravel(), logits.argmax(-1).ravel()
  labels = list(range(4))
  np.testing.assert_array_equal(details['confusion'], confusion_matrix(true, predicted, labels=labels))
  present = sorted(set(true) | set(predicted))
  iou = jaccard_score(true, predicted, labels=present, average=None)
  assert metrics['miou'] == pytest.approx(float(np.mean(iou)), abs=1e-12)
  assert [details['iou'][k] for k in present] == pytest.approx(list(iou), abs=1e-12)
  assert all(details['iou'][k] is None for k in labels if k not in present)
  assert metrics['pixel_accuracy'] == pytest.approx(float(np.mean(true == predicted)), abs=1e-12)
  ce = -np.take_along_axis(log_softmax(logits), split['mask'][..., None].astype(int), -1)
  assert metrics['loss'] == pytest.approx(float(ce.mean()), rel=1e-5)
  # One device counts the same pixels.
  one, one_details, *_ = evaluate(shapes_config(shared_data_dir, 'segmentation', 'tiny_seg',
                                                'parallel.num_devices=1'))
  assert one_details['confusion'] == details['confusion']


def test_segmentation_ignores_a_value_and_weighs_classes_as_torch_does():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 6, 4)).astype(np.float32)
  mask = rng.integers(0, 4, size=(3, 5, 6)).astype(np.uint8)
  mask[:, 0, :] = 255  # a void border
  weights = (0.5, 1.0, 2.0, 3.0)
  task = tasks.Segmentation(num_classes=4, class_weights=weights, ignore_value=255)
  loss, _ = task.loss(jnp.asarray(logits), {'mask': jnp.asarray(mask)})
  expected = torch.nn.functional.cross_entropy(
      torch.tensor(logits).permute(0, 3, 1, 2), torch.tensor(mask.astype(np.int64)),
      weight=torch.tensor(weights), ignore_index=255)
  assert float(loss) == pytest.approx(float(expected), rel=1e-5)
  valid = np.array([1.0, 1.0, 0.0], np.float32)  # the third example is padding
  sums = task.eval_sums(jnp.asarray(logits), {'mask': jnp.asarray(mask)}, jnp.asarray(valid))
  keep = (mask != 255) & (valid[:, None, None] > 0)
  expected = confusion_matrix(mask[keep], logits.argmax(-1)[keep], labels=range(4))
  np.testing.assert_array_equal(np.asarray(sums['confusion']), expected)


def test_classification_confusion_is_sklearns_without_the_padding():
  rng = np.random.default_rng(1)
  logits, labels = rng.normal(size=(40, 7)).astype(np.float32), rng.integers(0, 7, 40)
  valid = (np.arange(40) < 33).astype(np.float32)
  task = tasks.Classification(num_classes=7)
  scalars, details = task.finalize(jax.device_get(task.eval_sums(
      jnp.asarray(logits), {'label': jnp.asarray(labels, jnp.int32)}, jnp.asarray(valid))))
  predicted = logits.argmax(-1)
  np.testing.assert_array_equal(details['confusion'],
                                confusion_matrix(labels[:33], predicted[:33], labels=range(7)))
  assert scalars['accuracy'] == pytest.approx(float(np.mean(predicted[:33] == labels[:33])))


def numpy_iou(a, b):
  inter = (max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1])))
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def random_boxes(rng, n):
  corners = rng.uniform(0, 1, size=(n, 2, 2))
  return np.concatenate([corners.min(1), corners.max(1)], -1).astype(np.float32)


def test_box_iou_and_giou_are_torchvisions():
  torch = pytest.importorskip('torch')
  tv_ops = pytest.importorskip('torchvision.ops')
  rng = np.random.default_rng(2)
  a, b = random_boxes(rng, 37), random_boxes(rng, 23)
  b[:5] = a[:5]  # identical boxes
  b[5] = [0.2, 0.2, 0.3, 0.3]  # apart from every other
  xy = lambda x: torch.tensor(x[:, [1, 0, 3, 2]])  # noqa: E731  torchvision: (x1, y1, x2, y2)
  np.testing.assert_allclose(ops.box_iou(a, b), tv_ops.box_iou(xy(a), xy(b)).numpy(), atol=1e-6)
  np.testing.assert_allclose(ops.generalized_box_iou(a, b),
                             tv_ops.generalized_box_iou(xy(a), xy(b)).numpy(), atol=1e-6)
  np.testing.assert_allclose(ops.paired_iou(a[:23], b), np.diag(ops.box_iou(a[:23], b)), atol=1e-7)


def test_localization_metrics_are_numpys():
  rng = np.random.default_rng(3)
  n, k = 50, 4
  logits, labels = rng.normal(size=(n, k)).astype(np.float32), rng.integers(0, k, n)
  truth = random_boxes(rng, n)
  predicted = np.clip(truth + rng.normal(scale=0.08, size=truth.shape), 0, 1).astype(np.float32)
  predicted = np.concatenate([np.minimum(predicted[:, :2], predicted[:, 2:]),
                              np.maximum(predicted[:, :2], predicted[:, 2:])], -1)
  valid = (np.arange(n) < 45).astype(np.float32)
  task = tasks.Localization(num_classes=k, box_loss='giou', box_weight=2.0)
  outputs = {'logits': jnp.asarray(logits), 'box': jnp.asarray(predicted)}
  batch = {'label': jnp.asarray(labels, jnp.int32), 'bbox': jnp.asarray(truth)}
  scalars, _ = task.finalize(jax.device_get(task.eval_sums(outputs, batch, jnp.asarray(valid))))
  iou = np.array([numpy_iou(p, t) for p, t in zip(predicted, truth)])[:45]
  correct = (logits.argmax(-1) == labels)[:45]
  assert scalars['box_iou'] == pytest.approx(iou.mean(), abs=1e-6)
  assert scalars['accuracy'] == pytest.approx(correct.mean())
  assert scalars['localized'] == pytest.approx(np.mean(correct & (iou >= 0.5)))
  assert 0 < scalars['localized'] < scalars['accuracy']  # the case is not degenerate


def test_reconstruction_psnr_is_numpys_and_bce_is_torchs():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(6, 8, 8, 1)).astype(np.float32)
  images = rng.integers(0, 256, size=(6, 8, 8, 1)).astype(np.uint8)
  valid = np.array([1, 1, 1, 1, 0, 0], np.float32)
  task = tasks.Reconstruction(pixel_loss='bce')
  scalars, _ = task.finalize(jax.device_get(task.eval_sums(
      jnp.asarray(logits), {'image': jnp.asarray(images)}, jnp.asarray(valid))))
  target, recon = images[:4] / 255.0, 1 / (1 + np.exp(-logits[:4].astype(np.float64)))
  mse = ((recon - target) ** 2).mean((1, 2, 3))
  assert scalars['mse'] == pytest.approx(mse.mean(), rel=1e-5)
  assert scalars['psnr'] == pytest.approx(np.mean(10 * np.log10(1 / mse)), rel=1e-5)
  expected = torch.nn.functional.binary_cross_entropy_with_logits(
      torch.tensor(logits[:4]), torch.tensor(target, dtype=torch.float32))
  assert scalars['loss'] == pytest.approx(float(expected), rel=1e-5)


# ---- runs of each task: predictions agree with the evaluation ----

@pytest.fixture(scope='module')
def runs(tmp_path_factory, shared_data_dir):
  """A 2-step run of each task on 16x16 shapes."""
  root = tmp_path_factory.mktemp('task_runs')
  out = {}
  for task, model, extra in (('segmentation', 'tiny_seg', ()), ('localization', 'tiny_loc', ()),
                             ('reconstruction', 'tiny_ae', ()),
                             ('classification', 'conv_stack', ('model.filters=(8,)',))):
    out[task] = str(root / task)
    loop.train_and_evaluate(shapes_config(shared_data_dir, task, model, *extra), out[task])
  return out


@pytest.mark.parametrize('task,key', [('segmentation', 'miou'), ('localization', 'localized'),
                                      ('reconstruction', 'psnr')])
def test_a_run_ranks_and_reports_by_its_tasks_headline(runs, task, key):
  summary = json.load(open(os.path.join(runs[task], 'summary.json')))
  model = json.load(open(os.path.join(runs[task], 'model.json')))
  assert summary['task'] == model['task'] == task
  assert summary['headline']['metric'] == model['headline']['metric'] == key
  assert key in summary['final_eval'] and key in summary['best_eval']
  assert cnnlab.load_run(runs[task], 'best').step == summary['best_eval']['step']
  assert cnnlab.train.done_line(summary, runs[task]).startswith(f'done: 2 steps, test {key} ')


def test_predict_writes_panels_and_agrees_with_the_evaluation(runs, tmp_path, capsys):
  out = tmp_path / 'seg'
  assert cli.main(['predict', '--run', runs['segmentation'], '--dataset', 'shapes', '--num', '30',
                   '--out', str(out)]) == 0
  saved = np.load(out / 'predictions.npz')
  assert saved['mask'].shape == (30, 16, 16) and saved['probabilities'].shape == (30, 16, 16, 4)
  np.testing.assert_allclose(saved['probabilities'].sum(-1), 1.0, rtol=1e-5)
  matrix = confusion_matrix(saved['true_mask'].ravel(), saved['mask'].ravel(), labels=range(4))
  summary = json.load(open(os.path.join(runs['segmentation'], 'summary.json')))
  np.testing.assert_array_equal(matrix, summary['confusion_matrix'])
  assert sorted(os.listdir(out)) == ['panel_000.png', 'panel_001.png', 'panel_002.png',
                                     'panel_003.png', 'predictions.npz']
  for task, keys in (('localization', {'label', 'probabilities', 'box', 'true_label', 'true_bbox'}),
                     ('reconstruction', {'reconstruction'}), ('classification', {'logits', 'true_label'})):
    assert cli.main(['predict', '--run', runs[task], '--dataset', 'shapes', '--num', '5',
                     '--out', str(tmp_path / task)]) == 0
    assert keys | {'image'} == set(np.load(tmp_path / task / 'predictions.npz'))
    assert os.path.getsize(tmp_path / task / 'panel_000.png') > 5000
  loaded = cnnlab.load_run(runs['localization'])
  box = np.asarray(loaded.predict(saved['image'][:4])['box'])
  assert box.shape == (4, 4) and (box[:, :2] <= box[:, 2:]).all()


def test_predict_takes_a_users_images_and_refuses_the_wrong_size(runs, tmp_path, capsys):
  from PIL import Image
  folder = tmp_path / 'pictures'
  folder.mkdir()
  for i in range(3):  # other size, grey: resized and converted to the run's 16x16 RGB
    Image.fromarray(np.full((40, 30), 60 * i, np.uint8)).save(folder / f'{i}.png')
  assert cli.main(['predict', '--run', runs['segmentation'], '--images', str(folder),
                   '--out', str(tmp_path / 'out')]) == 0
  assert np.load(tmp_path / 'out' / 'predictions.npz')['image'].shape == (3, 16, 16, 3)
  run = cnnlab.load_run(runs['segmentation'])
  with pytest.raises(ValueError, match=r'trained on 16x16 images with 3 channels'):
    run.predict(np.zeros((2, 28, 28, 1), np.uint8))


# ---- bad input ----

def test_a_task_whose_keys_the_dataset_lacks_fails_validation(shared_data_dir):
  config = config_lib.load(QUICKSTART, ["task.name='segmentation'", f"data.data_dir='{shared_data_dir}'",
                                        "data.name='digits'"])
  with pytest.raises(config_lib.ConfigError, match=r"segmentation' needs 'mask'.*'digits' has 'image', 'label'"):
    config_lib.validate(config)


@pytest.mark.parametrize('overrides,message', [
    (('data.augment.mixup_alpha=0.2',), r'data.augment.mixup_alpha=0.2: mixing blends labels'),
    (('task.class_weights=(1.0, 2.0)',), r'task.class_weights has 2 values; shapes masks have 4'),
    (("checkpoint.best_metric='accuracy'",), r"best_metric='accuracy'.*loss, pixel_accuracy, miou"),
    (('model.num_classes=3',), r'model.num_classes=3 does not fit segmentation on shapes, which needs 4'),
])
def test_segmentation_settings_that_cannot_work_fail_validation(shared_data_dir, overrides, message):
  config = shapes_config(shared_data_dir, 'segmentation', 'tiny_seg', *overrides)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_a_model_whose_output_does_not_fit_the_task_fails_at_setup(shared_data_dir, tmp_path):
  config = shapes_config(shared_data_dir, 'segmentation', 'conv_stack')
  with pytest.raises(tasks.TaskError, match=r'expected shape \(2, 16, 16, 4\), the model gives \(2, 4\)'):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()  # refused before anything was written
  config = shapes_config(shared_data_dir, 'localization', 'tiny_seg', 'model.num_classes=3')
  with pytest.raises(tasks.TaskError, match=r"localization takes a dict \{'logits': \(2, 3\)"):
    loop.setup(config)
