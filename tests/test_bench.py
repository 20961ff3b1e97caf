"""bench/: the torch twins match cnnlab's parameter counts, and bench_train.py runs end to end.

No timing is asserted (DESIGN.md: speed is measured by bench/, never asserted in tests).
"""

import json
import math
import os
import subprocess
import sys

import pytest

from cnnlab import analysis, models
from cnnlab import config as config_lib
from cnnlab.train.loop import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'bench'))

import bench_train  # noqa: E402  (imports neither jax's backends nor torch at module level)


def benchmarked_model(arch):
  """The Flax model the benchmark trains: its experiment file with the benchmark's overrides."""
  config = config_lib.load(os.path.join(ROOT, arch.experiment), bench_train.cnnlab_overrides(
      arch, dtype='float32', batch=arch.batch_cpu, steps=1, cpu_devices=0))
  return build_model(config, arch.num_classes)


@pytest.mark.parametrize('name', sorted(bench_train.MODELS))
def test_cnnlab_counts_are_the_benchmarks(name):
  arch = bench_train.MODELS[name]
  assert analysis.count_params(benchmarked_model(arch), arch.input_shape) == arch.params


def test_known_counts():
  # The figures the issue quotes for cnnlab (resnet18: CIFAR stem, 10 classes; googlenet: no aux).
  counts = {n: a.params for n, a in bench_train.MODELS.items()}
  assert counts['resnet18_cifar'] == 11_173_962
  assert counts['resnet50'] == 25_557_032
  assert counts['googlenet'] == 6_624_904


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
  quickstart = analysis.count_params(build_model(config, 10), (28, 28, 1))
  twin = mnist5k_recipes_torch.build(mnist5k_recipes_torch.QUICKSTART, dropout=0.0)
  assert sum(p.numel() for p in twin.parameters()) == quickstart == 94_698
