"""Test setup: several CPU devices so parallel code is exercised on every run, strict dtypes."""

import os

# Must happen before JAX initialises its backends: 8 CPU devices, with the thread pool and
# rendezvous timeouts that make their collectives safe (parallel.patient_cpu_collectives).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
# Most of the suite's time is XLA:CPU compiling small programs that then run once or twice: LLVM's
# optimisation passes, and the newer fusion emitters, cost more than they save here (GoogLeNet's
# train step compiles in a third of the time; bench/README.md, "Compile time: GoogLeNet's ...").
# Tests compare programs built under the same flags, so they see the same arithmetic; users' runs
# keep XLA's defaults.
os.environ['XLA_FLAGS'] += (' --xla_backend_optimization_level=0'
                            ' --xla_llvm_disable_expensive_passes=true'
                            ' --xla_cpu_use_fusion_emitters=false')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from cnnlab import parallel  # noqa: E402  (imports jax, but starts no backend)

parallel.patient_cpu_collectives()
parallel.fast_cpu_flags()  # the convolution library cnnlab's entry points choose

import jax  # noqa: E402

jax.devices()  # start the backend now, with this environment
# Subprocesses the tests start size their own pool from their own device count.
os.environ.pop('PJRT_NPROC', None)
jax.config.update('jax_numpy_dtype_promotion', 'strict')


import contextlib  # noqa: E402
import fcntl  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def shared_root(tmp_path_factory, request):
  """A directory shared by the xdist workers of this test run and no other run."""
  worker = getattr(request.config, 'workerinput', None)
  base = tmp_path_factory.getbasetemp()
  root = (base.parent / f"cnnlab-session-{worker['testrunuid']}" if worker
          else base / 'cnnlab-session')
  root.mkdir(exist_ok=True)
  return root


@contextlib.contextmanager
def session_lock(root, name):
  """Holds ROOT/NAME.lock (across the xdist workers) and yields ROOT/NAME: what is built inside is
  built once per run, whichever worker gets there first."""
  with open(root / f'{name}.lock', 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield root / name
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope='session', autouse=True)
def shared_compilation_cache(shared_root):
  """One persistent XLA cache for the whole run, shared by the xdist workers: many tests build the
  same small models and steps, and a step compiled once is loaded by the next test that needs it.
  (Runs that set config.compilation_cache_dir='' do not turn it off; they just do not set one.)"""
  directory = shared_root / 'xla_cache'
  jax.config.update('jax_compilation_cache_dir', str(directory))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  yield


@pytest.fixture(scope='session')
def shared_data_dir(shared_root):
  """One data directory for the run's embedded datasets, shared by the xdist workers: each
  dataset is generated once (cnnlab.data locks a dataset while it generates it)."""
  return str(shared_root / 'datasets')


@pytest.fixture(autouse=True)
def registry_unchanged():
  """A test that registers a model must take it away again (monkeypatch the registry)."""
  from cnnlab import models
  before = models.list_models()
  yield
  assert models.list_models() == before, 'a test left a model in the global registry'
