"""Continuing a run exactly: what the loop needs around its checkpoints.

  check_resume_config   a resumed run must be the same experiment: structural keys that differ
                        from the workdir's config.json are refused (ConfigChangeError) unless
                        checkpoint.allow_config_change is set; length, logging, checkpointing and
                        device layout may change.
  encode/decode_metrics the train metrics of the steps since the last metrics.jsonl line, saved in
                        the checkpoint as raw bits, so the next line averages the same numbers.
  warn_schedule_change  a resumed run whose length changed stretches its learning-rate schedule:
                        say so.
  record_launch         WORKDIR/provenance.json: each launch's start step, config file and code
                        version (git commit, dirty flag, library versions).
  PreemptionWatch       SIGTERM -> a request the loop polls once per step; it then saves, waits
                        and raises checkpoint.Preempted (exit code 75).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cnnlab import config as config_lib, workdir as workdir_lib
from cnnlab.train.checkpoint import Checkpointer


# Keys that may differ when resuming: they change how long the run is, what is logged or saved,
# where data is read from, or the device layout (both strategies compute the same function of the
# global batch), never what a step computes. Everything else is structural. A key counts as
# listed when it or one of its parents is.
RESUMABLE_KEYS = (
    'train.num_steps', 'train.num_epochs', 'train.log_every_steps', 'train.eval_every_steps',
    'train.eval_batch_size', 'train.on_nonfinite', 'train.max_consecutive_skips',
    'data.data_dir', 'data.grain_workers', 'data.grain_prefetch',
    'parallel', 'log', 'checkpoint', 'compilation_cache_dir',
)


class ConfigChangeError(config_lib.ConfigError):
  """Resuming with structural config keys that differ from the workdir's config.json."""


# ---- the loop's record: exact continuation of logging and best tracking ----

def encode_metrics(pending: list[dict]) -> dict:
  """Per-step metric dicts (device or host scalars) -> JSON of their raw bits, so a resumed run
  averages exactly the same numbers into its next metrics.jsonl line."""
  if not pending:
    return {}
  host = jax.device_get(pending)
  out = {}
  for key in host[0]:
    values = np.stack([np.asarray(p[key]) for p in host])
    bits = values.view(np.dtype(f'u{values.dtype.itemsize}'))
    out[key] = {'dtype': values.dtype.name, 'bits': bits.tolist()}
  return out


def decode_metrics(encoded: dict) -> list[dict]:
  """encode_metrics, inverted: per-step dicts of numpy scalars with the saved dtypes and bits."""
  def column(v):
    bits = np.asarray(v['bits'], np.dtype(f'u{np.dtype(v["dtype"]).itemsize}'))
    return bits.view(v['dtype'])
  columns = {k: column(v) for k, v in encoded.items()}
  count = len(next(iter(columns.values()))) if columns else 0
  return [{k: v[i] for k, v in columns.items()} for i in range(count)]


# ---- resume checks, metrics.jsonl, provenance ----

def _resumable(key: str) -> bool:
  return any(key == k or key.startswith(k + '.') for k in RESUMABLE_KEYS)


class _Absent:
  def __repr__(self) -> str:
    return '<absent>'


ABSENT = _Absent()  # a key one of the two configs does not have


def config_changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
  """(key, old, new) for every structural key that differs between two config dicts."""
  a, b = config_lib.flatten(old), config_lib.flatten(new)
  return [(k, a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b))
          if not _resumable(k) and a.get(k, ABSENT) != b.get(k, ABSENT)]


def check_resume_config(workdir: str, config, step: int) -> None:
  """Raises ConfigChangeError naming every structural key that differs from the workdir's
  config.json, unless checkpoint.allow_config_change is set."""
  if config.checkpoint.allow_config_change:
    return
  path = workdir_lib.safe_join(workdir, workdir_lib.CONFIG)
  override = ('use a new --workdir, or pass --config.checkpoint.allow_config_change=True to '
              'resume anyway')
  if not os.path.isfile(path):
    raise ConfigChangeError(f'{workdir} has checkpoints (step {step}) but no config.json, so '
                            f'the resumed run cannot be checked against it; {override}')
  with open(path, encoding='utf-8') as f:
    old = json.load(f)
  new = json.loads(config_lib.to_json(config))
  changes = [f'{k}: {o!r} -> {n!r}' for k, o, n in config_changes(old, new)]
  if changes:
    raise ConfigChangeError(
        f'cannot resume {workdir} from step {step}: structural config keys differ from its '
        'config.json (the continued run would silently be another experiment):\n  '
        + '\n  '.join(changes) + f'\n{override}')


def warn_schedule_change(workdir: str, config, step: int) -> None:
  """Warns (stderr) when a resumed run trains for another number of steps than its config.json
  said, under a schedule whose shape depends on the length: the rest of the run follows the new
  schedule, not the one its first steps were on."""
  old = workdir_lib.read_json(os.path.join(workdir, workdir_lib.CONFIG))
  if old is None or config.optim.schedule == 'constant':
    return
  before = (old.get('train', {}).get('num_steps'), old.get('train', {}).get('num_epochs'))
  after = (config.train.num_steps, config.train.num_epochs)
  if before != after:
    print(f'cnnlab: warning: resuming {workdir} at step {step} with train.num_steps/num_epochs '
          f'{after} instead of {before}: the {config.optim.schedule!r} learning-rate schedule is '
          'recomputed for the new length, so the remaining steps follow another curve than the '
          'first ones did', file=sys.stderr, flush=True)


def code_version() -> dict:
  """cnnlab's version, its git commit and whether the tree has uncommitted changes (tracked or
  untracked files not ignored; None when not in a git checkout), and the library versions."""
  import flax
  source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args):
    try:
      result = subprocess.run(['git', '-C', source, *args], capture_output=True, text=True,
                              timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
      return None
    return result.stdout.strip()

  commit = git('rev-parse', 'HEAD')
  status = git('status', '--porcelain') if commit else None
  return {'cnnlab': importlib.metadata.version('cnnlab'), 'git_commit': commit,
          'git_dirty': None if status is None else bool(status),
          'jax': jax.__version__, 'flax': flax.__version__,
          'orbax_checkpoint': ocp.__version__, 'python': sys.version.split()[0]}


def record_launch(workdir: str, start_step: int, total_steps: int,
                  config_file: str | None = None) -> dict:
  """Appends this launch (time, start and last step, experiment file, code version) to
  WORKDIR/provenance.json, so every segment of a resumed run names the code that produced it.
  `end_launch` completes the entry with how the launch ended."""
  path = workdir_lib.safe_join(workdir, workdir_lib.PROVENANCE)
  launches = []
  if os.path.exists(path):  # unreadable: fail, rather than drop the launches it lists
    with open(path, encoding='utf-8') as f:
      launches = json.load(f).get('launches', [])
  entry = {'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'started': time.time(),
           'start_step': start_step, 'total_steps': total_steps,
           'config_file': config_file and os.path.abspath(config_file), **code_version()}
  workdir_lib.write_json(path, {'launches': launches + [entry]})
  return entry


def end_launch(workdir: str, step: int, wall_time_s: float, outcome: str,
               error: str | None = None) -> None:
  """Completes the last launch of WORKDIR/provenance.json with how it ended: `outcome` (one of
  workdir.OUTCOMES), the step it reached, its wall time and, when it failed, why."""
  path = workdir_lib.safe_join(workdir, workdir_lib.PROVENANCE)
  record = workdir_lib.read_json(path)
  if not record or not record.get('launches'):
    return
  record['launches'][-1].update(outcome=outcome, end_step=step, wall_time_s=wall_time_s,
                                **({'error': error} if error else {}))
  workdir_lib.write_json(path, record)


# ---- the process around a run: one writer per workdir, SIGTERM ----

class PreemptionWatch:
  """SIGTERM -> a request the loop polls once per step (`requested(step)`).

  Single process: a signal handler sets a flag (installed only from the main thread). Several
  processes: JAX's preemption sync point (jax.distributed catches SIGTERM), so every process stops
  at the same step."""

  def __init__(self, manager: Checkpointer):
    self._manager = manager.manager
    self._flag = threading.Event()
    self._previous = None
    self.multiprocess = jax.process_count() > 1
    if not self.multiprocess and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame) -> None:
    self._flag.set()

  def requested(self, step: int) -> bool:
    if self.multiprocess:
      return bool(self._manager.reached_preemption(step))
    return self._flag.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
