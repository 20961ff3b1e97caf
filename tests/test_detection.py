"""The detection task: its loss against torchvision's formulas (torch as the oracle), its
evaluation against CocoEvaluator on the same detections and the same on one device, four under
jit and four under pmap over a split that leaves a padded batch, a run end to end, predictions
and the configs it refuses. A tiny stand-in detector with the model interface keeps it fast."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnnlab
from cnnlab import cli, config as config_lib, data, tasks
from cnnlab.models import registry
from cnnlab.tasks.coco_eval import CocoEvaluator
from cnnlab.train import loop

# 30 test images: evaluation batches of 8 leave a padded last batch.
SHAPES = dict(resolution=16, num_classes=3, num_train=32, num_test=30, dataset_seed=3,
              max_objects=3, min_objects=1, min_scale=0.3, max_scale=0.5, max_overlap=0.3)
K, A, R, D = 3, 24, 8, 12  # classes, anchors, RoIs, detections of the stand-in
# The real detector, as small as it goes, on 32x32 images (a 4x4 map at stride 8).
FASTER_RCNN = ("model.name='faster_rcnn'", "model.backbone_args={'filters': (4, 8, 8)}",
               'model.anchor_sizes=(8.0, 16.0)', 'model.representation_size=16',
               'model.roi_output_size=3', 'model.rpn_post_nms_top_n_train=32',
               'model.rpn_post_nms_top_n_test=16', 'model.box_batch_size_per_image=16',
               'model.detections_per_image=8', 'data.shapes.resolution=32',
               'data.shapes.num_test=20', 'data.shapes.min_scale=0.25', 'data.shapes.max_scale=0.5')


def candidate_boxes() -> np.ndarray:
  """(A, 4) boxes: three sizes centred on each cell of a 4 x 4 grid, clipped to the image."""
  centres = (np.arange(4) + 0.5) / 4
  cy, cx = np.meshgrid(centres, centres, indexing='ij')
  boxes = [np.stack([cy - s / 2, cx - s / 2, cy + s / 2, cx + s / 2], -1).reshape(-1, 4)
           for s in (0.3, 0.45, 0.6)]
  return np.clip(np.concatenate(boxes), 0.0, 1.0).astype(np.float32)[::2]  # 24 of them


class TinyDet(nn.Module):
  """The faster_rcnn interface at its smallest: training draws its samples from the 'sample'
  stream and reads the targets; evaluation scores fixed candidate boxes from the image."""
  num_classes: int = K

  @nn.compact
  def __call__(self, x, train: bool = False, targets=None):
    b = x.shape[0]
    f = nn.relu(nn.Conv(8, (3, 3), strides=4)(x)).reshape(b, -1)
    rpn = nn.Dense(A * 5)(f).reshape(b, A, 5)
    roi = nn.Dense(R * (self.num_classes + 5))(f).reshape(b, R, self.num_classes + 5)
    if train:
      assert targets is not None and set(targets) == {'boxes', 'labels', 'num_objects'}
      k1, k2, k3, k4 = jax.random.split(self.make_rng('sample'), 4)
      shift = jnp.mean(targets['boxes'], (1, 2))[:, None, None]  # the targets are read
      return {'rpn_logits': rpn[..., 0], 'rpn_deltas': rpn[..., 1:],
              'rpn_labels': jax.random.randint(k1, (b, A), -1, 2),
              'rpn_targets': jax.random.normal(k2, (b, A, 4)) * 0.2 + shift,
              'roi_logits': roi[..., :self.num_classes + 1], 'roi_deltas': roi[..., -4:],
              'roi_labels': jax.random.randint(k3, (b, R), -1, self.num_classes + 1),
              'roi_targets': jax.random.normal(k4, (b, R, 4)) * 0.2}
    scores = nn.sigmoid(rpn[..., 0])
    order = jnp.argsort(-scores, axis=1)[:, :D]
    labels = jnp.argmax(rpn[..., 1:1 + self.num_classes], -1).astype(jnp.int32)
    boxes = jnp.broadcast_to(jnp.asarray(candidate_boxes()), (b, A, 4))
    top = jnp.take_along_axis(scores, order, 1)
    return {'boxes': jnp.take_along_axis(boxes, order[..., None], 1), 'scores': top,
            'labels': jnp.take_along_axis(labels, order, 1),
            'num_detections': jnp.sum(top > 0.3, 1).astype(jnp.int32)}


@pytest.fixture(scope='module', autouse=True)
def tiny_detector():
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(registry, '_REGISTRY', dict(registry._REGISTRY))
    registry.register('tiny_det', input_shape=(16, 16, 3), num_classes=K, task='detection')(TinyDet)
    yield


def detect_config(data_dir, *overrides):
  """base config: detection with the stand-in on 16x16 multi-object shapes, two steps;
  `overrides` as 'key=value' (FASTER_RCNN: the real detector)."""
  from cnnlab.configs import base
  config = base.get_config()
  args = ["task.name='detection'", "model.name='tiny_det'", "data.name='shapes'",
          *(f'data.shapes.{k}={v}' for k, v in SHAPES.items()), f"data.data_dir='{data_dir}'",
          'train.batch_size=8', 'train.eval_batch_size=8', 'train.num_steps=2',
          'train.log_every_steps=1', 'optim.learning_rate=0.01', "log.progress='none'",
          'log.tensorboard=False', "compilation_cache_dir=''", "data.augment.flip='random'",
          'parallel.num_devices=1', *overrides]
  for arg in args:
    key, _, value = arg.partition('=')
    config_lib.set_value(config, key, config_lib.parse_value(value))
  return config


# ---- the loss against torchvision's formulas ----

def random_train_outputs(rng, b=3, a=40, r=10, k=K):
  outputs = {'rpn_logits': rng.normal(size=(b, a)), 'rpn_deltas': rng.normal(size=(b, a, 4)) * 0.3,
             'rpn_labels': rng.integers(-1, 2, size=(b, a)),
             'rpn_targets': rng.normal(size=(b, a, 4)) * 0.3,
             'roi_logits': rng.normal(size=(b, r, k + 1)) * 2,
             'roi_deltas': rng.normal(size=(b, r, 4)) * 0.3,
             'roi_labels': rng.integers(-1, k + 1, size=(b, r)),
             'roi_targets': rng.normal(size=(b, r, 4)) * 0.3}
  return {key: v.astype(np.int32 if 'labels' in key else np.float32) for key, v in outputs.items()}


def test_the_loss_is_torchvisions_faster_rcnn_loss():
  torch = pytest.importorskip('torch')
  F = torch.nn.functional
  outputs = random_train_outputs(np.random.default_rng(0))
  task = tasks.Detection(num_classes=K)
  loss, terms = jax.jit(task.loss)(outputs, {})  # (one compilation, not one per operation)
  t = {k: torch.tensor(v) for k, v in outputs.items()}
  # torchvision.models.detection.rpn.RegionProposalNetwork.compute_loss, the batch's anchors
  # concatenated: sampled = positives and negatives.
  sampled, positive = t['rpn_labels'] >= 0, t['rpn_labels'] == 1
  objectness = F.binary_cross_entropy_with_logits(t['rpn_logits'][sampled],
                                                  t['rpn_labels'][sampled].float())
  rpn_box = F.smooth_l1_loss(t['rpn_deltas'][positive], t['rpn_targets'][positive], beta=1 / 9,
                             reduction='sum') / sampled.sum()
  # torchvision.models.detection.roi_heads.fastrcnn_loss over the sampled RoIs.
  sampled, foreground = t['roi_labels'] >= 0, t['roi_labels'] > 0
  labels = t['roi_labels'][sampled].long()
  roi_class = F.cross_entropy(t['roi_logits'][sampled], labels)
  roi_box = F.smooth_l1_loss(t['roi_deltas'][foreground], t['roi_targets'][foreground],
                             beta=1 / 9, reduction='sum') / labels.numel()
  expected = {'rpn_objectness': objectness, 'rpn_box': rpn_box, 'roi_class': roi_class,
              'roi_box': roi_box}
  assert set(terms) == set(expected)
  for key, value in expected.items():
    assert float(terms[key]) == pytest.approx(float(value), rel=1e-5), key
  assert float(loss) == pytest.approx(float(sum(expected.values())), rel=1e-5)
  # Nothing sampled: zero, not NaN; and the gradient reaches only the model's predictions.
  empty = dict(outputs, rpn_labels=np.full_like(outputs['rpn_labels'], -1),
               roi_labels=np.full_like(outputs['roi_labels'], -1))
  assert float(jax.jit(task.loss)(empty, {})[0]) == 0.0
  floats = {k: jnp.asarray(v) for k, v in outputs.items() if 'labels' not in k}
  ints = {k: jnp.asarray(v) for k, v in outputs.items() if 'labels' in k}
  grads = jax.jit(jax.grad(lambda floats: task.loss({**floats, **ints}, {})[0]))(floats)
  assert not np.any(np.asarray(grads['rpn_targets']))
  assert not np.any(np.asarray(grads['roi_targets']))
  assert np.any(np.asarray(grads['rpn_deltas'])) and np.any(np.asarray(grads['roi_logits']))


def test_the_train_step_gives_the_model_its_targets_and_a_sample_stream():
  rng = np.random.default_rng(1)
  batch = {'boxes': jnp.asarray(rng.uniform(size=(2, 3, 4)), jnp.float32),
           'labels': jnp.asarray([[0, 2, -1], [1, -1, -1]], jnp.int32),
           'num_objects': jnp.asarray([2, 1], jnp.int32), 'image': jnp.zeros((2, 16, 16, 3))}
  task = tasks.Detection(num_classes=K)
  inputs = task.model_inputs(batch, train=True)
  assert set(inputs) == {'targets'} and set(inputs['targets']) == {'boxes', 'labels',
                                                                   'num_objects'}
  assert task.model_inputs(batch, train=False) == {}
  assert tasks.Classification(num_classes=3).model_inputs(batch, train=True) == {}


# ---- evaluation: CocoEvaluator on the same detections, whatever the devices ----

def evaluate(config):
  run = loop.setup(config)
  state = run.par.place_state(run.initial_state())
  return (*run.evaluate(run.compile_eval(state), state), run, state)


def read_test_split(data_dir):
  source = data.load('shapes', 'test', data_dir=data_dir, **SHAPES)
  examples = [source[i] for i in range(len(source))]
  return {k: np.stack([np.asarray(e[k]) for e in examples])
          for k in ('image', 'labels', 'boxes', 'num_objects')}


def test_evaluation_is_coco_over_the_split_on_one_or_four_devices_jit_or_pmap(shared_data_dir):
  metrics, details, run, state = evaluate(detect_config(shared_data_dir))
  split = read_test_split(shared_data_dir)
  images = data.augment.normalize(split['image'], run.settings.mean, run.settings.std)
  out = jax.device_get(run.model.apply(jax.device_get(state.variables), images, train=False))
  coco = CocoEvaluator(K, image_size=(16, 16))
  coco.add(out['boxes'], out['scores'], out['labels'], split['boxes'], split['labels'],
           num_detections=out['num_detections'], num_objects=split['num_objects'])
  expected = coco.summarize()
  assert details['images'] == 30 and details['coco'] == pytest.approx(expected, abs=1e-12)
  assert metrics == pytest.approx({k: expected[k] for k in ('AP', 'AP50', 'AP75', 'AR100')},
                                  abs=1e-12)
  assert 0 < metrics['AP50'] < 1 and 0 < metrics['AR100']  # not a degenerate case
  for strategy in ('jit', 'pmap'):
    other, other_details, *_ = evaluate(detect_config(shared_data_dir, 'parallel.num_devices=4',
                                                      f"parallel.strategy='{strategy}'"))
    assert other == pytest.approx(metrics, abs=1e-9), strategy
    assert other_details['coco'] == pytest.approx(details['coco'], abs=1e-9), strategy


# ---- a run, end to end ----

@pytest.fixture(scope='module')
def run_dir(tmp_path_factory, shared_data_dir):
  """Two steps of the real faster_rcnn, evaluated on 20 images (a padded batch of 8)."""
  path = str(tmp_path_factory.mktemp('detect') / 'run')
  loop.train_and_evaluate(detect_config(shared_data_dir, *FASTER_RCNN), path)
  return path


def test_a_run_trains_on_the_four_losses_and_reports_coco_ap(run_dir):
  summary = json.load(open(os.path.join(run_dir, 'summary.json')))
  assert summary['task'] == 'detection' and summary['headline']['metric'] == 'AP50'
  assert set(summary['final_eval']) == {'AP', 'AP50', 'AP75', 'AR100', 'step'}
  assert set(summary['coco']) == {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10',
                                  'AR100', 'ARs', 'ARm', 'ARl'}
  records = cnnlab.workdir.read_metrics(run_dir)
  train = [r for r in records if r['kind'] == 'train']
  assert len(train) == 2
  for record in train:
    for key in ('loss', 'rpn_objectness', 'rpn_box', 'roi_class', 'roi_box'):
      assert np.isfinite(record[key]), key
    assert record['loss'] == pytest.approx(sum(record[k] for k in (
        'rpn_objectness', 'rpn_box', 'roi_class', 'roi_box')), rel=1e-5)
  line = cnnlab.train.done_line(summary, run_dir)
  assert line.startswith('done: 2 steps, test AP50 ') and 'loss' not in line
  assert cnnlab.load_run(run_dir, 'best').step == summary['best_eval']['step']


def test_the_run_tools_take_an_evaluation_without_a_loss(run_dir, capsys):
  root = os.path.dirname(run_dir)
  assert cli.main(['runs', root]) == 0
  assert 'AP50 ' in capsys.readouterr().out
  assert cli.main(['report', root, '--no-plots']) == 0
  rows = open(os.path.join(root, 'results.csv')).read().splitlines()
  assert rows[0].startswith('AP50_mean,AP50_std,loss_mean,loss_std')
  assert rows[1].split(',')[2:4] == ['', '']  # no evaluation loss
  assert cli.main(['report', run_dir]) == 0  # one run: its curves (train loss, eval AP50)


def test_predict_gives_boxes_scores_labels_and_counts_and_draws_panels(run_dir, tmp_path):
  out = tmp_path / 'predict'
  assert cli.main(['predict', '--run', run_dir, '--dataset', 'shapes', '--num', '10',
                   '--out', str(out)]) == 0
  saved = np.load(out / 'predictions.npz')
  assert set(saved) == {'image', 'boxes', 'scores', 'labels', 'num_detections', 'true_labels',
                        'true_boxes', 'true_num_objects'}
  assert saved['boxes'].shape == (10, 8, 4) and saved['num_detections'].shape == (10,)
  assert sorted(os.listdir(out)) == ['panel_000.png', 'panel_001.png', 'predictions.npz']
  assert os.path.getsize(out / 'panel_000.png') > 5000
  prediction = cnnlab.load_run(run_dir).predict(saved['image'])  # (the CLI's compilation)
  assert set(prediction) == {'boxes', 'scores', 'labels', 'num_detections'}
  for key in prediction:
    np.testing.assert_array_equal(prediction[key], saved[key])


# ---- configs that cannot work ----

@pytest.mark.parametrize('overrides,message', [
    (('data.shapes.max_objects=0',),
     r"task.name='detection' needs several objects per image.*data.name='shapes' has one label "
     r'per image.*set data.shapes.max_objects >= 1'),
    (('data.augment.mixup_alpha=0.2',), r'data.augment.mixup_alpha=0.2: mixing blends labels'),
    (("checkpoint.best_metric='loss'",), r"best_metric='loss'.*AP, AP50, AP75, AR100"),
])
def test_detection_settings_that_cannot_work_fail_validation(shared_data_dir, overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(detect_config(shared_data_dir, *overrides))


def test_a_model_that_is_no_detector_fails_at_setup(shared_data_dir):
  config = detect_config(shared_data_dir, "model.name='conv_stack'", 'model.filters=(8,)')
  with pytest.raises(tasks.TaskError, match=r"detection takes a dict \['boxes', 'scores'"):
    loop.setup(config)
