"""Several XLA devices in one CPU process: the thread pool that keeps their collectives from
deadlocking (parallel.patient_cpu_collectives), and a run that deadlocked before it existed."""

import os
import subprocess
import sys

import pytest

from cnnlab import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pool_gets_two_threads_per_device_from_the_flags():
  environ = {'XLA_FLAGS': '--xla_foo=1 --xla_force_host_platform_device_count=8'}
  parallel.patient_cpu_collectives(environ=environ)
  assert environ['PJRT_NPROC'] == str(max(os.cpu_count(), 16))
  for flag in parallel.CPU_COLLECTIVE_FLAGS:
    assert flag in environ['XLA_FLAGS']
  assert environ['XLA_FLAGS'].startswith('--xla_foo=1 --xla_force_host_platform_device_count=8')


def test_pool_keeps_a_larger_setting_and_raises_a_smaller_one():
  environ = {'PJRT_NPROC': '64'}
  parallel.patient_cpu_collectives(3, environ)
  assert environ['PJRT_NPROC'] == '64'
  environ = {'PJRT_NPROC': '1'}
  parallel.patient_cpu_collectives(3, environ)
  assert environ['PJRT_NPROC'] == str(parallel.cpu_pool_threads(3))


def test_one_device_leaves_the_pool_alone_and_keeps_set_timeouts():
  environ = {'XLA_FLAGS': '--xla_cpu_collective_timeout_seconds=7'}
  parallel.patient_cpu_collectives(1, environ)
  assert 'PJRT_NPROC' not in environ
  assert '--xla_cpu_collective_timeout_seconds=7' in environ['XLA_FLAGS']
  assert '--xla_cpu_collective_timeout_seconds=300' not in environ['XLA_FLAGS']


@pytest.mark.xdist_group('subprocess')
def test_eight_devices_on_this_host_do_not_deadlock():
  # With XLA's default pool (one thread per core) this run deadlocks within a few steps on a
  # 2-core host and XLA aborts it at the 20 s rendezvous timeout; with cnnlab's pool it finishes.
  env = {k: v for k, v in os.environ.items() if k not in ('PJRT_NPROC', 'XLA_FLAGS')}
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', 'stress_collectives.py'), '--devices', '8',
       '--steps', '300', '--timeout', '20'],
      env={**env, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  assert 'ok: 300 steps' in result.stdout


def test_fast_cpu_flags_turn_ynnpack_convolutions_off_unless_the_user_chose():
  environ = {'XLA_FLAGS': '--xla_foo=1'}
  parallel.fast_cpu_flags(environ)
  assert environ['XLA_FLAGS'] == '--xla_foo=1 --xla_cpu_experimental_ynn_fusion_type='
  chosen = {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=individual_convolution'}
  parallel.fast_cpu_flags(chosen)
  assert chosen['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type=individual_convolution'


def test_this_backend_compiles_convolutions_without_ynnpack():
  """conftest applied fast_cpu_flags before the backend started: no YNNPACK fusion is emitted."""
  import jax
  import jax.numpy as jnp
  conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  # Big enough that YNNPACK takes it when allowed (a 2x8x8x4 input it never takes). Compiled only.
  text = conv.lower(jnp.ones((128, 14, 14, 32)), jnp.ones((3, 3, 32, 8))).compile().as_text()
  assert 'convolution' in text and 'ynn_fusion' not in text
