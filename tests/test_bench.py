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
