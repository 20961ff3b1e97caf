"""A researcher's own architecture and experiment, in a directory outside the repository: trained
with `cnnlab train`, summarised with `cnnlab summary`, reloaded with `load_run` from elsewhere."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL = '''
import flax.linen as nn
from cnnlab.models import register

@register('my_net', input_shape=(8, 8, 1), num_classes=10)
class MyNet(nn.Module):
  num_classes: int = 10
  width: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(self.width, (3, 3))(x))
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))
'''

EXPERIMENT = '''
from cnnlab.configs import base

def get_config():
  config = base.get_config()
  config.model.name = 'my_net'
  config.model.imports = ('my_models',)
  config.model.width = 6
  config.data.name = 'digits'
  config.data.data_dir = {data_dir!r}
  config.data.augment.translate = 0
  config.train.batch_size = 32
  config.train.num_steps = 3
  config.train.log_every_steps = 1
  config.log.progress = 'none'
  config.log.tensorboard = False
  config.compilation_cache_dir = ''
  return config
'''


def cnnlab(*args, cwd):
  env = {**{k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'PJRT_NPROC')},
         'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', 'cnnlab.cli', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.xdist_group('subprocess')
def test_own_model_trains_summarises_and_reloads_from_elsewhere(tmp_path, monkeypatch):
  mine = tmp_path / 'my_research'
  mine.mkdir()
  (mine / 'my_models.py').write_text(MODEL)
  (mine / 'my_experiment.py').write_text(EXPERIMENT.format(data_dir=str(tmp_path / 'data')))

  trained = cnnlab('train', '--config', 'my_experiment.py', '--workdir', 'runs/mine', cwd=mine)
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert 'done: 3 steps' in trained.stdout
  summary = json.loads((mine / 'runs' / 'mine' / 'summary.json').read_text())
  assert summary['num_params'] == 6 * 9 + 6 + 6 * 10 + 10
  assert summary['macs'] > 0 and summary['receptive_field'] == [3.0, 3.0]

  summarised = cnnlab('summary', '--model', 'my_net', '--import', 'my_models', '--set', 'width=6',
                      cwd=mine)
  assert summarised.returncode == 0, summarised.stderr[-3000:]
  assert f"total params: {summary['num_params']:,}" in summarised.stdout
  missing = cnnlab('summary', '--model', 'my_net', cwd=mine)
  assert missing.returncode == 2 and '--import my_models' in missing.stderr

  # From another directory, with the user's directory nowhere on the import path: the run knows
  # its experiment file, and its model module beside it.
  from cnnlab import models
  from cnnlab.models import registry
  monkeypatch.setattr(registry, '_REGISTRY', dict(registry._REGISTRY))
  monkeypatch.setattr(sys, 'path', list(sys.path))
  monkeypatch.delitem(sys.modules, 'my_models', raising=False)
  monkeypatch.chdir(tmp_path)
  import cnnlab as cnnlab_package
  run = cnnlab_package.load_run(str(mine / 'runs' / 'mine'))
  assert 'my_net' in models.list_models() and run.model.width == 6
  logits = run.predict(np.zeros((2, 8, 8, 1), np.uint8))
  assert logits.shape == (2, 10) and np.isfinite(logits).all()
  sys.modules.pop('my_models', None)
