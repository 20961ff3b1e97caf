"""Checkpoints and fault tolerance: exact resume after SIGKILL/SIGTERM (separate processes), kills
at random moments including inside an asynchronous save, retention across restarts, write errors,
resharding, refused config changes, and loading that never unpickles or leaves the workdir.

Subprocess runs use 2 CPU devices and share one compilation cache (a run with the cache loads the
executable the first run compiled, as users' runs do by default), so each costs a few seconds.
"""

import errno
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import cnnlab
from cnnlab import cli, data, parallel, runs, workdir as workdir_lib
from conftest import session_lock
from cnnlab.train import checkpoint, loop, resume
from cnnlab.workdir import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, 'experiments')
# The tests' own experiment (not quickstart, which gets tuned): conv_stack with batch norm on the
# 8x8 digits, SGD with Nesterov momentum and weight decay, a onecycle schedule and augmentation, so
# parameters, batch statistics, optimizer state and the RNG all matter to an exact resume.
EXPERIMENT = """
from cnnlab.configs import base

def get_config():
  c = base.get_config()
  c.model.filters = (8, 16)
  c.model.kernel_size = 3
  c.model.stride = 1
  c.model.padding = 'SAME'
  c.model.pool = 'max'
  c.model.norm = 'batch'
  c.model.head = 'global_avg'
  c.data.name = 'digits'
  c.data.data_dir = {data_dir!r}
  c.data.augment.translate = 1
  c.train.batch_size = 32
  c.optim.name = 'sgd'
  c.optim.learning_rate = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 5e-4
  c.optim.schedule = 'onecycle'
  c.parallel.cpu_devices = 0
  c.compilation_cache_dir = ''
  return c
"""
TIMING_KEYS = ('images_per_sec', 'step_time_s')
# The subprocess run: 60 steps of conv_stack (batch norm, momentum, augmentation) on digits. Logs
# every 7 steps, so checkpoints (every 20) fall inside logging intervals.
RUN = dict(train__num_steps=60, train__log_every_steps=7, train__eval_every_steps=20,
           checkpoint__every_steps=20, checkpoint__keep=3)
# The run killed at random moments: longer, saving every 2 steps (its reference saves only at the
# end and at new best evaluations: checkpointing does not change what is computed).
LONG = dict(train__num_steps=150, train__eval_every_steps=50)


# ---- shared, built once per test session (across xdist workers) ----

@pytest.fixture(scope='session')
def data_dir(shared_root):
  """The digits dataset, prepared once, and the tests' experiment file beside it."""
  with session_lock(shared_root, 'ckpt_datasets') as path:
    if not (path / 'ready').exists():
      data.prepare('digits', str(path))
      (path.parent / 'ckpt_experiment.py').write_text(
          EXPERIMENT.format(experiments=EXPERIMENTS, data_dir=str(path)))
      (path / 'ready').write_text('')
  return str(path)


def experiment(data_dir):
  return os.path.join(os.path.dirname(data_dir), 'ckpt_experiment.py')


@pytest.fixture(scope='session')
def cache_dir(shared_root):
  path = shared_root / 'ckpt_xla_cache'
  path.mkdir(exist_ok=True)
  return str(path)


def cli_args(workdir, data_dir, cache_dir, **overrides):
  values = {'compilation_cache_dir': cache_dir, 'log__progress': 'plain',
            'log__tensorboard': False, **RUN, **overrides}
  return ['train', '--config', experiment(data_dir), '--workdir', str(workdir),
          *(f'--config.{k.replace("__", ".")}={v}' for k, v in values.items())]


def env():
  # One device: these tests are about resuming (resharding is tested in-process), and a single
  # device keeps their many subprocesses fast.
  return {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
          'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}


# Runs the CLI with a fault injected at a fixed point (a real signal, or a kill inside Orbax's
# commit), so the interesting moments are hit deterministically.
DRIVER = r'''
import os, signal, sys, time
from cnnlab import cli, workdir as workdir_lib
from cnnlab.train import checkpoint, resume
fault, at = os.environ['FAULT'], int(os.environ['FAULT_STEP'])
commit = int(os.environ.get('COMMIT_STEP', '-1'))  # wait for this save to commit before going on
save = checkpoint.Checkpointer.save
def save_and_commit(self, step, *args, **kwargs):
  save(self, step, *args, **kwargs)
  if step == commit:
    self.wait()
checkpoint.Checkpointer.save = save_and_commit
requested = resume.PreemptionWatch.requested
def requested_with_fault(self, step):
  if step == at and fault in ('SIGKILL', 'SIGTERM'):
    os.kill(os.getpid(), getattr(signal, fault))
    time.sleep(0.5)  # the handler runs as soon as the signal lands
  return requested(self, step)
resume.PreemptionWatch.requested = requested_with_fault
if fault == 'kill_before_rename':  # every file of the step written, its commit file too: die
  from orbax.checkpoint._src.path import atomicity
  rename = atomicity.async_path.rename
  async def rename_or_die(src, dst, *args, **kwargs):
    if os.path.basename(str(dst)) == str(at):
      os.kill(os.getpid(), signal.SIGKILL)
    return await rename(src, dst, *args, **kwargs)
  atomicity.async_path.rename = rename_or_die
sys.exit(cli.main(sys.argv[1:]))
'''


def run_cli(args, fault=None, at=None, commit=None, timeout=900):
  command = [sys.executable, '-m', 'cnnlab.cli', *args]
  extra = {}
  if fault:
    command = [sys.executable, '-c', DRIVER, *args]
    extra = {'FAULT': fault, 'FAULT_STEP': str(at),
             'COMMIT_STEP': str(-1 if commit is None else commit)}
  return subprocess.run(command, env={**env(), **extra}, capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT)


def uninterrupted(shared_root, data_dir, cache_dir, name, **overrides):
  with session_lock(shared_root, name) as workdir:
    if not (workdir / 'summary.json').exists():
      result = run_cli(cli_args(workdir, data_dir, cache_dir, **overrides))
      assert result.returncode == 0, result.stderr[-3000:]
  return str(workdir)


@pytest.fixture(scope='session')
def reference(shared_root, data_dir, cache_dir):
  """An uninterrupted 60-step run (built once per session, whichever worker asks first)."""
  return uninterrupted(shared_root, data_dir, cache_dir, 'ckpt_reference')


@pytest.fixture(scope='session')
def long_reference(shared_root, data_dir, cache_dir):
  return uninterrupted(shared_root, data_dir, cache_dir, 'ckpt_long_reference',
                       checkpoint__every_steps=0, **LONG)


def committed(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.exists(os.path.join(directory, n, 'commit_success.txt')))


def leftovers(workdir):
  """Partial saves and retention's deletion area."""
  return [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if not n.isdigit()]


def records(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(workdir)]


def state_arrays(workdir, step):
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    return jax.device_get(ckpt.restore_arrays(step))
  finally:
    ckpt.close()


def assert_same_run(workdir, reference, steps=60):
  """Bit for bit: every logged number (timings aside), every variable, the summary's evaluations."""
  assert records(workdir) == records(reference)
  a, b = state_arrays(workdir, steps), state_arrays(reference, steps)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  for key in ('final_eval', 'best_eval', 'num_params', 'steps'):
    assert (json.load(open(os.path.join(workdir, 'summary.json')))[key]
            == json.load(open(os.path.join(reference, 'summary.json')))[key]), key


# ---- exact resume after a kill or a preemption ----

def test_sigkill_then_resume_is_bitwise_identical(tmp_path, data_dir, cache_dir, reference):
  workdir = tmp_path / 'run'
  args = cli_args(workdir, data_dir, cache_dir)
  killed = run_cli(args, fault='SIGKILL', at=30, commit=20)
  assert killed.returncode == -signal.SIGKILL
  assert committed(workdir) == [20]
  logged = [r['step'] for r in read_metrics(workdir)]
  assert max(logged) == 28  # records past the checkpoint, which the resumed run must drop
  assert runs.status(str(workdir)).state == 'interrupted'  # a kill leaves no word

  resumed = run_cli(args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  summary = json.load(open(workdir / 'summary.json'))
  # The summary describes the whole run: both launches, their times summed.
  assert [(x['start_step'], x['end_step']) for x in summary['launches']] == [(0, 20), (20, 60)]
  assert summary['train_time_s'] == pytest.approx(sum(x['train_time_s'] for x in summary['launches']))
  assert_same_run(str(workdir), reference)
  launches = json.load(open(workdir / 'provenance.json'))['launches']
  assert [x['start_step'] for x in launches] == [0, 20]
  assert [x.get('outcome') for x in launches] == [None, 'finished']  # the kill left no outcome
  assert runs.status(str(workdir)).state == 'finished'
  assert all('git_commit' in x and 'git_dirty' in x for x in launches)
  assert leftovers(workdir) == []


def test_sigterm_saves_exits_75_and_resumes_bitwise_identical(tmp_path, data_dir, cache_dir,
                                                              reference):
  workdir = tmp_path / 'run'
  args = cli_args(workdir, data_dir, cache_dir)
  # SIGTERM during step 33: between log lines (28, 35) and checkpoints (20, 40).
  preempted = run_cli(args, fault='SIGTERM', at=33)
  assert preempted.returncode == workdir_lib.EXIT_PREEMPTED == 75, preempted.stderr[-3000:]
  assert 'checkpoint at step 33 committed' in preempted.stderr
  assert committed(workdir) == [20, 33] and leftovers(workdir) == []
  assert not (workdir / 'summary.json').exists()
  preempted_status = runs.status(str(workdir))
  assert (preempted_status.state, preempted_status.step) == ('preempted', 33)

  resumed = run_cli(args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert json.load(open(workdir / 'summary.json'))['launches'][-1]['start_step'] == 33
  assert_same_run(str(workdir), reference)


def test_kills_at_random_moments_never_corrupt_and_resume_exactly(tmp_path, data_dir, cache_dir,
                                                                  long_reference):
  """One process per kill, each resuming the last: first killed inside an asynchronous save just
  before its commit (every file written), then at random moments while saving every 2 steps, a
  few of them by SIGTERM. After every kill each committed step restores; at the end the run
  equals the uninterrupted one."""
  workdir = str(tmp_path / 'run')
  args = cli_args(workdir, data_dir, cache_dir, checkpoint__every_steps=2, **LONG)
  killed = run_cli(args, fault='kill_before_rename', at=20)
  assert killed.returncode == -signal.SIGKILL
  assert committed(workdir) == [14, 16, 18]  # keep=3; 20 was never committed...
  # ...though fully written, its commit file included: only the committing rename was missing.
  [partial] = [n for n in leftovers(workdir) if n.startswith('20.orbax-checkpoint-tmp')]
  assert os.path.exists(os.path.join(workdir, 'checkpoints', partial, 'commit_success.txt'))

  rng = random.Random(1234)
  latest, kills, mid_save = 18, 0, 0
  for attempt in range(5):
    sig = signal.SIGTERM if attempt in (1, 3) else signal.SIGKILL
    log = tmp_path / f'stderr{attempt}.txt'
    with open(log, 'w') as stderr:
      process = subprocess.Popen([sys.executable, '-m', 'cnnlab.cli', *args], env=env(), cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=stderr)
      deadline = time.time() + 600
      while process.poll() is None and time.time() < deadline:  # wait for progress, then strike
        if committed(workdir)[-1] > latest:
          break
        time.sleep(0.01)
      time.sleep(rng.uniform(0.0, 0.25))
      process.send_signal(sig)
      process.wait(timeout=600)
    if process.returncode == 0:  # finished before the signal landed
      break
    expected = 75 if sig == signal.SIGTERM else -signal.SIGKILL
    assert process.returncode == expected, log.read_text()[-3000:]
    kills += 1
    mid_save += any('orbax-checkpoint-tmp' in n for n in leftovers(workdir))
    steps = committed(workdir)
    assert steps[-1] >= latest  # the latest committed checkpoint is never lost
    latest = steps[-1]
    for step in steps:  # everything that looks committed is complete
      assert int(state_arrays(workdir, step)['step']) == step
  print(f'{kills} kills, {mid_save} of them during an asynchronous save')
  assert kills >= 3

  final = run_cli(args)
  assert final.returncode == 0, final.stderr[-3000:]
  assert_same_run(workdir, long_reference, steps=150)
  assert leftovers(workdir) == []


# ---- in-process: retention, write errors, resharding, config changes, safety ----

def make_config(data_dir, **overrides):
  from cnnlab import config as config_lib
  config = config_lib.load(experiment(data_dir))
  base = dict(log__progress='none', train__num_steps=4, train__log_every_steps=1,
              train__eval_every_steps=2, optim__schedule='constant', optim__learning_rate=0.05)
  for key, value in {**base, **overrides}.items():
    config_lib.set_value(config, key.replace('__', '.'), value)
  return config


@pytest.fixture(scope='session')
def trained(shared_root, data_dir):
  """A finished 4-step run (checkpoints at 2 and 4), trained once per session; tests copy it
  before changing anything."""
  with session_lock(shared_root, 'ckpt_trained') as workdir:
    if not (workdir / 'summary.json').exists():
      loop.train_and_evaluate(make_config(data_dir, checkpoint__keep=3), str(workdir))
  return str(workdir)


def loop_target(config):
  """What the loop restores onto: the TrainState's shapes on one device (traced, not compiled)."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.eval_shape(loop.setup(config).initial_state)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)


def copy_run(source, tmp_path):
  target = str(tmp_path / 'copy')
  shutil.copytree(source, target, symlinks=True)
  return target


@pytest.mark.parametrize('metric,mode,values', [('accuracy', 'max', [0.5, 0.9, 0.6, 0.7, 0.8]),
                                                ('loss', 'min', [2.0, 0.1, 1.0, 0.5, 0.3])])
def test_retention_keeps_last_and_best_across_a_restart(tmp_path, metric, mode, values):
  tree = {'w': jnp.arange(3.0), 'step': jnp.zeros((), jnp.int32)}

  def open_manager():
    return checkpoint.Checkpointer(str(tmp_path), keep=2, best_metric=metric, best_mode=mode)

  ckpt = open_manager()
  for step, value in zip(range(1, 5), values):
    ckpt.save(step, {**tree, 'step': jnp.int32(step)}, metrics={metric: value})
    ckpt.wait()
    best = 1 if step == 1 else 2
    assert ckpt.best_step() == best and {best, step} <= set(ckpt.all_steps())
  assert ckpt.all_steps() == [2, 3, 4]  # the last 2, plus the best
  ckpt.close()

  ckpt = open_manager()  # a new process: the metrics come back from disk
  assert ckpt.best_step() == 2 and ckpt.metrics(2) == {metric: values[1]}
  ckpt.save(5, tree, metrics={metric: values[4]})
  ckpt.save(6, tree)  # no evaluation at this step
  ckpt.wait()
  assert ckpt.all_steps() == [2, 5, 6] and ckpt.best_step() == 2
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '5', '6']  # deleted for real
  assert int(state_arrays(str(tmp_path), 2)['step']) == 2
  ckpt.close()


@pytest.mark.parametrize('fail_at', [4, 8], ids=['surfaces_at_next_save', 'surfaces_at_end'])
def test_failed_async_write_fails_the_run_and_keeps_the_last_checkpoint(
    tmp_path, data_dir, monkeypatch, fail_at):
  from orbax.checkpoint._src.path import atomicity
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def disk_full(self):  # runs in Orbax's background commit thread
    if self.get_final().name == str(fail_at):
      raise OSError(errno.ENOSPC, 'No space left on device')
    return await finalize(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', disk_full)
  workdir = str(tmp_path / 'run')
  config = make_config(data_dir, train__num_steps=8, checkpoint__every_steps=2, checkpoint__keep=1)
  previous = fail_at - 2
  with pytest.raises(checkpoint.CheckpointWriteError,
                     match=rf'step {fail_at}.*No space left on device.*'
                     rf'last committed checkpoint, step {previous}'):
    loop.train_and_evaluate(config, workdir)
  assert committed(workdir)[-1] == previous and fail_at not in committed(workdir)
  assert any(n.startswith(f'{fail_at}.orbax-checkpoint-tmp') for n in leftovers(workdir))
  assert int(state_arrays(workdir, previous)['step']) == previous
  if fail_at == 4:  # it stopped at the next save (step 6), then resumes once the disk has room
    assert max(r['step'] for r in read_metrics(workdir)) == 6
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', finalize)
    summary = loop.train_and_evaluate(config, workdir)
    assert summary['launches'][-1]['start_step'] == previous and committed(workdir)[-1] == 8
    assert leftovers(workdir) == []  # the half-written step is gone


def test_restore_reshards_across_device_counts_and_strategies(tmp_path):
  jit8 = parallel.Parallel.create('jit', 8)
  tree = {'sharded': jax.device_put(jnp.arange(64 * 3, dtype=jnp.float32).reshape(64, 3),
                                    NamedSharding(jit8.mesh, P('data'))),
          'replicated': jax.device_put(jnp.linspace(0, 1, 7), jit8.replicated),
          'rng': jax.device_put(jax.random.PRNGKey(3), jit8.replicated),
          'step': jax.device_put(jnp.int32(5), jit8.replicated)}
  expected = jax.device_get(tree)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(5, tree)
  ckpt.wait()

  one = parallel.Parallel.create('jit', 1)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one.replicated),
                        tree)
  single, _ = ckpt.restore(target)
  assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(single))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(single), expected)

  pmap8 = parallel.Parallel.create('pmap', 8)  # as the loop does: restore, then place
  replicas = jax.device_get(pmap8.place_state(single))
  for i in range(8):
    jax.tree.map(lambda r, e: np.testing.assert_array_equal(r[i], e), replicas, expected)

  jit2 = parallel.Parallel.create('jit', 2)  # straight into another sharding
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(jit2.mesh, P('data') if x.ndim == 2 else P())), tree)
  two, _ = ckpt.restore(target)
  assert two['sharded'].sharding.spec == P('data') and len(two['sharded'].sharding.device_set) == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(two), expected)
  ckpt.close()


def test_a_run_saved_under_pmap_resumes_on_one_device(tmp_path, data_dir):
  pmap = dict(parallel__strategy='pmap', parallel__num_devices=8)
  straight = str(tmp_path / 'straight')
  loop.train_and_evaluate(make_config(data_dir, train__num_steps=6, **pmap), straight)
  moved = str(tmp_path / 'moved')
  loop.train_and_evaluate(make_config(data_dir, **pmap), moved)  # 4 steps under pmap
  summary = loop.train_and_evaluate(make_config(data_dir, train__num_steps=6,
                                                parallel__num_devices=1), moved)
  assert summary['launches'][-1]['start_step'] == 4 and summary['num_devices'] == 1
  a, b = records(straight), records(moved)
  assert [r['step'] for r in a] == [r['step'] for r in b]
  assert [r for r in a if r['step'] <= 4] == [r for r in b if r['step'] <= 4]
  # Steps 5 and 6 continue the same computation on one device: equal up to summation order.
  np.testing.assert_allclose([r['loss'] for r in b], [r['loss'] for r in a], rtol=2e-5)


def test_resuming_with_changed_structure_is_refused_unless_allowed(tmp_path, data_dir, trained,
                                                                   capsys):
  workdir = copy_run(trained, tmp_path)
  config_json = open(os.path.join(workdir, 'config.json')).read()
  changed = make_config(data_dir, model__filters=(8, 32), train__batch_size=64, optim__name='adam')
  with pytest.raises(resume.ConfigChangeError) as e:
    loop.train_and_evaluate(changed, workdir)
  message = str(e.value)
  for needle in ('model.filters: [8, 16] -> [8, 32]', 'train.batch_size: 32 -> 64',
                 "optim.name: 'sgd' -> 'adam'", 'checkpoint.allow_config_change=True'):
    assert needle in message, message
  assert 'log.' not in message and 'train.num_steps' not in message
  assert open(os.path.join(workdir, 'config.json')).read() == config_json  # untouched
  code = cli.main(['train', '--config', experiment(data_dir), '--workdir', workdir,
                   '--config.train.num_steps=6', '--config.model.kernel_size=5'])
  assert code == 2 and 'model.kernel_size: 3 -> 5' in capsys.readouterr().err

  # Longer training, other logging and checkpointing, another layout: a continuation.
  extended = make_config(data_dir, train__num_steps=6, train__log_every_steps=2,
                         checkpoint__every_steps=3, parallel__num_devices=2)
  assert loop.train_and_evaluate(extended, workdir)['launches'][-1]['start_step'] == 4
  # An explicit override accepts a structural change.
  with pytest.raises(resume.ConfigChangeError, match='optim.learning_rate: 0.05 -> 0.01'):
    resume.check_resume_config(workdir, make_config(data_dir, optim__learning_rate=0.01), 6)
  resume.check_resume_config(workdir, make_config(data_dir, optim__learning_rate=0.01,
                                                  checkpoint__allow_config_change=True), 6)


def test_config_changes_lists_structural_keys_only():
  old = {'model': {'filters': [8, 16]}, 'train': {'num_steps': 4, 'batch_size': 32},
         'log': {'progress': 'none'}, 'parallel': {'strategy': 'jit'}, 'seed': 0}
  new = {'model': {'filters': [8, 16], 'dropout': 0.1}, 'train': {'num_steps': 9, 'batch_size': 32},
         'log': {'progress': 'plain'}, 'parallel': {'strategy': 'pmap'}, 'seed': 1}
  changes = resume.config_changes(old, new)
  assert [(k, o, n) for k, o, n in changes if k == 'seed'] == [('seed', 0, 1)]
  assert [k for k, _, _ in changes] == ['model.dropout', 'seed']
  assert repr(changes[0][1]) == '<absent>'


def test_loading_never_unpickles(tmp_path, data_dir, trained, monkeypatch):
  workdir = copy_run(trained, tmp_path)

  def forbidden(*args, **kwargs):
    raise AssertionError('the load path unpickled something')

  for name in ('load', 'loads', 'Unpickler'):
    monkeypatch.setattr(pickle, name, forbidden)
  monkeypatch.setattr(np, 'load', forbidden)
  target = loop_target(make_config(data_dir))
  run = cnnlab.load_run(workdir)  # the load path works without pickle or np.load...
  assert run.step == 4 and run.variables['params']
  assert cnnlab.load_run(workdir, 'best').step in (2, 4)
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  state, record = ckpt.restore(target)  # ...and so does the loop's resume
  ckpt.close()
  assert int(state.step) == 4 and record['final']['step'] == 4


class _Payload:
  def __reduce__(self):
    return (open, (os.environ['CNNLAB_PWNED'], 'w'))


@pytest.mark.parametrize('where', ['state/extra.pkl', 'state/d/0123456789abcdef', 'loop/loop.npy'])
def test_a_planted_pickle_is_refused(tmp_path, data_dir, trained, monkeypatch, where):
  workdir = copy_run(trained, tmp_path)
  marker = tmp_path / 'pwned'
  monkeypatch.setenv('CNNLAB_PWNED', str(marker))
  path = os.path.join(workdir, 'checkpoints', '4', where)
  with open(path, 'wb') as f:
    pickle.dump(_Payload(), f, protocol=4)
  with pytest.raises(workdir_lib.UnsafeCheckpointError, match='pickle'):
    cnnlab.load_run(workdir)
  ckpt = checkpoint.Checkpointer(workdir)
  with pytest.raises(workdir_lib.UnsafeCheckpointError, match='pickle'):
    ckpt.restore(loop_target(make_config(data_dir)))  # the loop's resume
  ckpt.close()
  assert not marker.exists()
  assert cnnlab.load_run(workdir, 2).step == 2  # other checkpoints still load


def test_paths_cannot_escape_the_workdir(tmp_path, data_dir, trained):
  root = tmp_path / 'root'
  (root / 'runs').mkdir(parents=True)
  outside = tmp_path / 'outside'
  outside.mkdir()
  assert workdir_lib.safe_join(str(root), 'runs', 'lr=0.1,k=3') == str(root / 'runs' / 'lr=0.1,k=3')
  for bad in ('../outside', 'runs/../../outside', '/etc', '', 'a\0b'):
    with pytest.raises(workdir_lib.UnsafeCheckpointError):
      workdir_lib.safe_join(str(root), bad)
  os.symlink(outside, root / 'runs' / 'link')
  with pytest.raises(workdir_lib.UnsafeCheckpointError, match='outside'):
    workdir_lib.safe_join(str(root), 'runs', 'link', 'config.json')

  # A checkpoints directory, a step, or a file in a step that is a symlink is refused.
  workdir = copy_run(trained, tmp_path)
  elsewhere = str(tmp_path / 'elsewhere')
  shutil.move(os.path.join(workdir, 'checkpoints'), elsewhere)
  os.symlink(elsewhere, os.path.join(workdir, 'checkpoints'))
  with pytest.raises(workdir_lib.UnsafeCheckpointError, match='outside'):
    cnnlab.load_run(workdir)
  os.unlink(os.path.join(workdir, 'checkpoints'))
  shutil.move(elsewhere, os.path.join(workdir, 'checkpoints'))
  step4 = os.path.join(workdir, 'checkpoints', '4')
  shutil.move(step4, elsewhere)
  os.symlink(elsewhere, step4)
  with pytest.raises(workdir_lib.UnsafeCheckpointError, match='symlink'):
    cnnlab.load_run(workdir, 4)
  os.unlink(step4)
  shutil.move(elsewhere, step4)
  os.symlink('/etc/passwd', os.path.join(step4, 'loop', 'extra'))
  with pytest.raises(workdir_lib.UnsafeCheckpointError, match='symlink'):
    cnnlab.load_run(workdir, 4)


def test_partial_saves_are_ignored_and_cleaned(tmp_path, trained):
  workdir = copy_run(trained, tmp_path)
  directory = os.path.join(workdir, 'checkpoints')
  shutil.copytree(os.path.join(directory, '4'), os.path.join(directory, '6.orbax-checkpoint-tmp-1'))
  shutil.copytree(os.path.join(directory, '4'), os.path.join(directory, '8'))
  os.remove(os.path.join(directory, '8', 'commit_success.txt'))  # a step never committed
  reader = checkpoint.Checkpointer(workdir, read_only=True)
  assert reader.latest_step() == 4 and reader.all_steps() == [2, 4]
  reader.close()
  assert sorted(os.listdir(directory)) == ['2', '4', '6.orbax-checkpoint-tmp-1', '8']  # read-only
  writer = checkpoint.Checkpointer(workdir)
  assert writer.latest_step() == 4 and sorted(writer.removed) == ['6.orbax-checkpoint-tmp-1', '8']
  writer.close()
  assert sorted(os.listdir(directory)) == ['2', '4']


def test_metrics_past_the_checkpoint_and_torn_lines_are_dropped(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  lines = [json.dumps({'kind': 'train', 'step': s, 'loss': 1.0 / s}) for s in (7, 14, 21, 28)]
  path.write_text('\n'.join(lines) + '\n{"kind": "train", "st')  # killed mid-line
  assert workdir_lib.truncate_metrics(str(tmp_path), 20) == 3
  assert [r['step'] for r in read_metrics(str(tmp_path))] == [7, 14]


def test_one_writer_per_workdir(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  lock = workdir_lib.WorkdirLock(workdir)
  try:
    with pytest.raises(workdir_lib.WorkdirBusyError, match=f'pid {os.getpid()}'):
      loop.train_and_evaluate(make_config(data_dir), workdir)
  finally:
    lock.release()
  workdir_lib.WorkdirLock(workdir).release()  # free again
