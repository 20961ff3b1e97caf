"""The README's Python blocks run as written, in order, in one namespace (as a reader pastes
them), from a directory holding a short run of the quickstart at runs/quickstart."""

import os
import re

import numpy as np

from cnnlab import config as config_lib
from cnnlab.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks():
  text = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
  return re.findall(r'```python\n(.*?)```', text, flags=re.S)


def test_readme_python_blocks_run(tmp_path, monkeypatch):
  blocks = python_blocks()
  assert len(blocks) >= 5
  config = config_lib.load(os.path.join(ROOT, 'experiments', 'quickstart.py'), [
      'train.num_steps=2', 'model.filters=(8, 8, 8)', "log.progress='none'", 'log.tensorboard=False',
      "compilation_cache_dir=''", f"data.data_dir='{tmp_path / 'data'}'"])
  loop.train_and_evaluate(config, str(tmp_path / 'runs' / 'quickstart'))
  monkeypatch.chdir(tmp_path)
  from cnnlab.models import registry
  monkeypatch.setattr(registry, '_REGISTRY', dict(registry._REGISTRY))  # my_net is the README's
  namespace = {}
  for block in blocks:
    exec(compile(block, 'README.md', 'exec'), namespace)  # noqa: S102
  assert namespace['logits'].shape == (4, 10) and np.isfinite(namespace['logits']).all()
  assert namespace['stage2'].ndim == 4
  assert namespace['get_config']().model.name == 'my_net'
  assert len(namespace['get_sweep']()) == 54
