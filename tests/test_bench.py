"""bench/: the torch twins match cnnlab's parameter counts, and bench_train.py runs end to end.

No timing is asserted: speed is measured by bench/, never asserted in tests.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from cnnlab import analysis, models
from cnnlab import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'bench'))

import bench_train  # noqa: E402  (imports neither jax's backends nor torch at module level)


def benchmarked_model(arch):
  """The Flax model the benchmark trains: its experiment file with the benchmark's overrides."""
  config = config_lib.load(os.path.join(ROOT, arch.experiment), bench_train.cnnlab_overrides(
      arch, dtype='float32', batch=arch.batch_cpu, steps=1, cpu_devices=0))
  return models.from_config(config, arch.num_classes)


@pytest.mark.parametrize('name', sorted(bench_train.MODELS))
def test_cnnlab_counts_are_the_benchmarks(name):
  arch = bench_train.MODELS[name]
  assert analysis.count_params(benchmarked_model(arch), arch.input_shape) == arch.params


@pytest.mark.parametrize('name', sorted(bench_train.MODELS))
def test_torch_twin_has_cnnlab_param_count(name):
  torch = pytest.importorskip('torch')
  import torch_models
  arch = bench_train.MODELS[name]
  with torch.device('meta'):  # shapes only, no memory
    twin = torch_models.create(arch.model, num_classes=arch.num_classes, **dict(arch.torch_kwargs))
  assert torch_models.count_params(twin) == arch.params


def test_googlenet_twin_with_aux_heads_matches_too():
  torch = pytest.importorskip('torch')
  import torch_models
  with torch.device('meta'):
    twin = torch_models.create('googlenet', num_classes=1000, aux_logits=True)
  model = models.create_model('googlenet', num_classes=1000, aux_logits=True)
  assert torch_models.count_params(twin) == analysis.count_params(model, (224, 224, 3))


def test_torch_twin_batch_norm_settings():
  torch = pytest.importorskip('torch')
  import torch_models
  with torch.device('meta'):
    resnet = torch_models.create('resnet18', num_classes=10, stem='cifar')
    googlenet = torch_models.create('googlenet', aux_logits=False)
  bns = [m for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  assert bns and all(m.momentum == 0.1 and m.eps == 1e-5 for m in bns)
  bns = [m for m in googlenet.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  assert bns and all(m.momentum == 0.1 and m.eps == 1e-3 for m in bns)


def test_quick_run_writes_expected_json(tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'bench.json'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', 'bench_train.py'), '--quick', '--device', 'cpu',
       '--models', 'simple_cnn', '--dtypes', 'fp32', '--peers', 'cnnlab,torch_nchw',
       '--json', str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  result = json.loads(out.read_text())
  assert result['meta']['steps'] == 3 and result['meta']['warmup'] == 1
  rows = result['rows']
  assert [r['peer'] for r in rows] == ['cnnlab', 'torch_nchw']
  for r in rows:
    assert r['ok'] and r['model'] == 'simple_cnn' and r['dtype'] == 'float32'
    assert r['batch'] == 128 and r['input_shape'] == [28, 28, 1]
    assert r['num_params'] == bench_train.MODELS['simple_cnn'].params
    assert len(r['step_times_s']) == 4 and r['images_per_s'] > 0 and r['peak_mib'] > 0
    assert r['peak_kind'] == 'max_rss'
    assert all(math.isfinite(x) for x in r['losses'])
  cnnlab, torch_row = rows
  assert cnnlab['compile_s'] > 0 and cnnlab['strategy'] == 'jit'
  # The inherited 8-device test split is dropped for cnnlab's default, parallel.cpu_devices=1.
  assert cnnlab['num_devices'] == 1
  assert 'device_count' not in cnnlab['xla_flags']
  assert "data.name='synthetic'" in cnnlab['overrides']
  assert cnnlab['ratio_cnnlab_over_peer'] == 1.0
  assert torch_row['ratio_cnnlab_over_peer'] == pytest.approx(
      cnnlab['images_per_s'] / torch_row['images_per_s'])
  assert 'images/s' in proc.stdout and 'torch_nchw' in proc.stdout


def test_mnist5k_torch_peer_builds_the_quickstarts_network():
  """bench/mnist5k_recipes_torch.py's default network is experiments/quickstart.py's: same layers,
  same parameter count."""
  pytest.importorskip('torch')
  import mnist5k_recipes_torch
  config = config_lib.load(os.path.join(ROOT, 'experiments', 'quickstart.py'))
  quickstart = analysis.count_params(models.from_config(config, 10), (28, 28, 1))
  twin = mnist5k_recipes_torch.build(mnist5k_recipes_torch.QUICKSTART, dropout=0.0)
  assert sum(p.numel() for p in twin.parameters()) == quickstart == 94_698


HLO = '''HloModule jit_run

%fused_computation.1 (param_0: f32[8,4,4,2]) -> f32[2,4,4,8] {
  %param_0 = f32[8,4,4,2]{3,2,1,0} parameter(0)
  %transpose.1 = f32[2,4,4,8]{0,2,1,3} transpose(%param_0), dimensions={3,1,2,0}
  ROOT %copy.1 = f32[2,4,4,8]{3,2,1,0} copy(%transpose.1)
}

%fused_computation.2 (param_0.1: f32[8,4,4,2]) -> f32[2] {
  %param_0.1 = f32[8,4,4,2]{3,2,1,0} parameter(0)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[2]{0} reduce(%param_0.1, %constant.1), dimensions={0,1,2}, to_apply=%add
}

ENTRY %main.1 (x: f32[8,4,4,2], k: f32[3,3,2,2]) -> f32[2] {
  %x = f32[8,4,4,2]{3,2,1,0} parameter(0)
  %k = f32[3,3,2,2]{3,2,1,0} parameter(1)
  %conv.1 = f32[8,4,4,2]{3,2,1,0} convolution(%x, %k), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(run)/jvp(Net)/conv"}
  %conv.2 = f32[8,4,4,2]{3,2,1,0} convolution(%conv.1, %k), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(run)/transpose(jvp(Net))/conv"}
  %transpose_copy_fusion = f32[2,4,4,8]{3,2,1,0} fusion(%conv.2), kind=kLoop, calls=%fused_computation.1
  %conv.3 = f32[2,3,3,2]{3,2,1,0} convolution(%transpose_copy_fusion, %transpose_copy_fusion), window={size=4x4 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(run)/transpose(jvp(Net))/conv"}
  ROOT %reduce_fusion = f32[2]{0} fusion(%conv.2), kind=kInput, calls=%fused_computation.2
}
'''


def test_profile_step_classifies_compiled_operations():
  import profile_step
  instructions, computations = profile_step.parse_hlo(HLO)
  kinds = {name: profile_step.classify(name, instructions, computations)
           for name in ('conv.1', 'conv.2', 'conv.3', 'transpose_copy_fusion', 'reduce_fusion', 'x')}
  assert kinds == {'conv.1': 'convolution fwd', 'conv.2': 'convolution dx',
                   'conv.3': 'convolution dw', 'transpose_copy_fusion': 'copy',
                   'reduce_fusion': 'reduction', 'x': 'other'}
  events = [{'name': 'conv.1', 'dur': 3000.0}, {'name': 'reduce_fusion', 'dur': 1000.0},
            {'name': 'reduce_fusion', 'dur': 1000.0}, {'name': 'ThunkExecutor::Execute', 'dur': 9e6}]
  summary = profile_step.summarise(events, instructions, computations, steps=2)
  assert summary['kinds_ms'] == {'convolution fwd': 1.5, 'reduction': 1.0}
  assert summary['total_ms'] == 2.5


def test_profile_step_runs_on_the_real_step(tmp_path):
  out = tmp_path / 'profile.json'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', 'profile_step.py'), '--model', 'simple_cnn',
       '--steps', '2', '--warmup', '1', '--json', str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'PYTHONPATH': ROOT})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  result = json.loads(out.read_text())
  assert result['model'] == 'simple_cnn' and result['batch'] == 128
  assert {'convolution fwd', 'convolution dw', 'elementwise'} <= set(result['kinds_ms'])
  assert result['total_ms'] == pytest.approx(sum(result['kinds_ms'].values()))
  assert 'not in events' in proc.stdout


def test_detect_torch_peer_is_cnnlabs_detector_on_cnnlabs_data(shared_data_dir):
  """bench/bench_detect.py's torch peer: torchvision's FasterRCNN with cnnlab's parameter count
  under experiments/detect_shapes.py, cnnlab's learning rates, cnnlab's training batches (indices,
  flips, normalisation, boxes), and one training step and an evaluation by cnnlab's COCO scoring
  on a handful of images."""
  torch = pytest.importorskip('torch')
  pytest.importorskip('torchvision')
  import jax
  import numpy as np
  import bench_detect
  from cnnlab.data import device as data_device
  from cnnlab.train import optim, step as step_lib

  config = bench_detect.experiment_config()
  bench_detect.check_supported(config)
  assert bench_detect.bench_overrides() == []  # the default is the shipped experiment
  cnnlab_params = analysis.count_params(bench_detect.cnnlab_model(config, 4), (64, 64, 3))
  torch.manual_seed(0)
  twin = bench_detect.build_torch_model(config, 4)
  assert bench_detect.count_params(twin) == cnnlab_params == 676_326
  assert bench_detect.backbone_settings(bench_detect.cnnlab_model(config, 4))['feature_stride'] == 4

  # cnnlab's schedule, step by step: the experiment's 625 steps and a one-step smoke run.
  for total, per_epoch in ((625, 125), (1, 2)):
    factors = bench_detect.lr_factors(config, total, per_epoch)
    lr = optim.schedule(config.optim, total, per_epoch)
    expected = np.asarray(jax.vmap(lr)(np.arange(total, dtype=np.int32)))
    np.testing.assert_allclose(np.asarray(factors) * config.optim.learning_rate, expected,
                               rtol=1e-5, atol=1e-9)

  # A tiny dataset of the experiment's kind: cnnlab's batches of steps 0-2 against the torch side's.
  small = bench_detect.experiment_config([
      *bench_detect.bench_overrides(num_train=8, num_test=4), 'train.batch_size=4',
      f'data.data_dir={str(shared_data_dir)!r}'])
  train, info = bench_detect.load_split(small, 'train')
  test, _ = bench_detect.load_split(small, 'test')
  mean, std = bench_detect.normalization(small, info)
  indices, flips = bench_detect.cnnlab_stream(small, 8, 3)
  assert indices.shape == flips.shape == (3, 4)
  settings = step_lib.StepSettings(model=None, tx=None, learning_rate=None, task=None, mean=mean,
                                   std=std, augment=small.data.augment.to_dict())
  state, arrays = bench_detect.run_state(small.seed), {k: np.asarray(v) for k, v in train.items()}

  @jax.jit
  def cnnlab_batch(step):  # what cnnlab's train step trains on at `step`
    batch = data_device.device_batch(arrays, step, seed=small.seed, batch_size=4, num_examples=8)
    return step_lib.preprocess(state.replace(step=step), batch, settings)

  for step in range(3):  # two epochs of two steps
    images, batch = cnnlab_batch(np.int32(step))
    np.testing.assert_array_equal(np.asarray(batch['index']), indices[step])
    x, targets = bench_detect.torch_batch(train, indices[step], flips[step], mean, std)
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), np.asarray(images), atol=1e-5)
    for i, target in enumerate(targets):
      n = int(batch['num_objects'][i])
      xyxy = np.asarray(batch['boxes'][i, :n])[:, [1, 0, 3, 2]] * 64
      np.testing.assert_allclose(target['boxes'].numpy(), xyxy, atol=1e-5)
      np.testing.assert_array_equal(target['labels'].numpy(),
                                    np.asarray(batch['labels'][i, :n]) + 1)
  assert flips.any() and not flips.all()  # the flips are visible in the comparison

  # One step and an evaluation by cnnlab's detection task.
  model = twin.train()  # the model only depends on config.model
  optimizer, scheduler = bench_detect.make_optimizer(model, small, 3, 2)
  x, targets = bench_detect.torch_batch(train, indices[0], flips[0], mean, std)
  losses = bench_detect.train_step(model, optimizer, scheduler, x, targets)
  assert set(losses) == {'rpn_objectness', 'rpn_box', 'roi_class', 'roi_box', 'loss'}
  assert all(math.isfinite(v) for v in losses.values())
  task = bench_detect.detection_task(small, info)
  metrics, details = bench_detect.evaluate_torch(model, test, task, mean, std, batch_size=4)
  assert set(metrics) == {'AP', 'AP50', 'AP75', 'AR100'}
  assert all(0.0 <= v <= 1.0 for v in metrics.values()) and details['images'] == 4
  assert model.training
