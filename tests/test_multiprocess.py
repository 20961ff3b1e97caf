"""Multi-host for real: 2 processes x 2 CPU devices (jax.distributed, gloo collectives on
localhost) must log the same losses as 1 process x 4 devices."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from cnnlab import data
from cnnlab.workdir import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def command(workdir, data_dir, *extra):
  return [sys.executable, '-m', 'cnnlab.cli', 'train',
          '--config', os.path.join(ROOT, 'experiments', 'quickstart.py'), '--workdir', workdir,
          '--config.data.name=digits', '--config.data.data_dir=' + data_dir,
          '--config.model.filters=(8, 16)', '--config.model.kernel_size=3',
          '--config.model.stride=1', '--config.model.pool=max',
          '--config.train.batch_size=32',
          '--config.train.num_steps=6', '--config.train.log_every_steps=1',
          '--config.train.eval_every_steps=3', '--config.optim.schedule=constant',
          '--config.optim.learning_rate=0.05', '--config.compilation_cache_dir=',
          '--config.log.progress=plain', *extra]


def env(devices):
  return {**os.environ, 'JAX_PLATFORMS': 'cpu',
          'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}


@pytest.mark.xdist_group('subprocess')
def test_two_processes_match_one_process_with_the_same_devices(tmp_path):
  data_dir = str(tmp_path / 'data')
  data.prepare('digits', data_dir)  # once, before several processes read it
  single = str(tmp_path / 'single')
  subprocess.run(command(single, data_dir), env=env(4), check=True, timeout=600,
                 capture_output=True)

  multi, port = str(tmp_path / 'multi'), free_port()
  procs = [subprocess.Popen(command(multi, data_dir, f'--coordinator=127.0.0.1:{port}',
                                    '--num-processes=2', f'--process-id={i}'),
                            env=env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  outputs = [p.communicate(timeout=600)[0].decode() for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]

  def losses(workdir, kind):
    return [(r['step'], r['loss']) for r in read_metrics(workdir) if r['kind'] == kind]
  assert len(losses(multi, 'train')) == 6
  np.testing.assert_allclose(losses(multi, 'train'), losses(single, 'train'), rtol=1e-5)
  np.testing.assert_allclose(losses(multi, 'eval'), losses(single, 'eval'), rtol=1e-5)
  summary = open(os.path.join(multi, 'summary.json')).read()
  assert '"num_processes": 2' in summary and '"num_devices": 4' in summary
