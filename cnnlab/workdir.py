"""A run directory: the names of its files, its lock, safe paths and writes. No JAX here.

A run directory (the `--workdir` of `cnnlab train`) holds:

  config.json       the resolved config of the run (written once a launch has restored its state)
  model.json        what the model takes and gives: input shape, classes, input normalisation,
                    parameters, MACs, receptive field (what `load_run` and reports need)
  provenance.json   one entry per launch: start and end step, how it ended, config file, code
                    version
  metrics.jsonl     one JSON record per log interval and per evaluation (the source of truth)
  tensorboard/      the same metrics as TensorBoard events
  checkpoints/      Orbax checkpoints, one committed directory per step
  summary.json      written when the run finishes: what it achieved and what it cost
  .lock             held by the process training in the directory

and, for a run of a sweep, point.json (its point), run.log (its output) and error.json (why its last
attempt failed). Everything that reads or writes these names goes through this module.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
from typing import Any

CONFIG = 'config.json'
MODEL = 'model.json'
PROVENANCE = 'provenance.json'
METRICS = 'metrics.jsonl'
TENSORBOARD = 'tensorboard'
CHECKPOINTS = 'checkpoints'
SUMMARY = 'summary.json'
LOCK = '.lock'
POINT = 'point.json'
LOG = 'run.log'
ERROR = 'error.json'

# Exit status of a run stopped by SIGTERM after committing a checkpoint: EX_TEMPFAIL (sysexits.h),
# "try again later". Launchers requeue on it (launch/slurm.sbatch spells it too); relaunching the
# same command resumes.
EXIT_PREEMPTED = 75

# How a launch ended, as provenance.json records it.
OUTCOMES = ('finished', 'preempted', 'failed', 'interrupted')


class UnsafeCheckpointError(ValueError):
  """A checkpoint or path that loading refuses: a symlink, a path leaving the workdir, or a
  file that could execute code when read (pickle)."""


class WorkdirBusyError(ValueError):
  """Another process is training in the same workdir."""


def safe_join(root: str, *parts: str) -> str:
  """root/parts..., refusing parts that would leave `root` or could: absolute paths, any '..'
  component (even one that comes back, as in 'runs/../runs'), empty or NUL names, and symlinks
  whose target lies outside `root`. Use it for any path built from a run name or config value."""
  for part in parts:
    part = str(part)
    pieces = part.replace('\\', '/').split('/')
    if not part or '\0' in part or os.path.isabs(part) or '..' in pieces:
      raise UnsafeCheckpointError(f'path component {part!r} would leave {root!r}')
  path = os.path.join(root, *map(str, parts))
  real_root, real = os.path.realpath(root), os.path.realpath(path)
  if os.path.commonpath([real_root, real]) != real_root:
    raise UnsafeCheckpointError(f'{path!r} resolves to {real!r}, outside {real_root!r} '
                                '(a symlink?)')
  return path


def atomic_write(path: str, text: str) -> None:
  """Writes a file so that a reader (or a restart after a kill) sees the old or the new content,
  never a torn one."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json(path: str, value: Any) -> None:
  atomic_write(path, json.dumps(value, indent=2, default=repr))


def read_json(path: str) -> Any:
  """The JSON value in `path`, or None when it is missing or unreadable."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _records(path: str) -> list[tuple[str, dict]]:
  """(line, record) for each complete JSON object line of a .jsonl file (a torn line is skipped)."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict):
        out.append((line if line.endswith('\n') else line + '\n', record))
  return out


def read_metrics(workdir: str) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl, in order (a torn last line, from a kill, is skipped)."""
  return [record for _, record in _records(os.path.join(workdir, METRICS))]


def truncate_metrics(workdir: str, step: int) -> int:
  """Drops metrics.jsonl records past `step` (logged by a killed run after its last checkpoint)
  and a torn last line; returns how many records were dropped. Atomic (write, then rename)."""
  path = safe_join(workdir, METRICS)
  if not os.path.exists(path):
    return 0
  with open(path, encoding='utf-8') as f:
    lines = sum(1 for line in f if line.strip())
  kept = [line for line, record in _records(path) if int(record.get('step', 0)) <= step]
  atomic_write(path, ''.join(kept))
  return lines - len(kept)


class WorkdirLock:
  """An exclusive lock on WORKDIR/.lock for the life of a run (released by the OS if the process
  dies), so a requeued job cannot write into a workdir while the old one still runs."""

  def __init__(self, workdir: str):
    self.path = safe_join(workdir, LOCK)
    self._file = open(self.path, 'a+', encoding='utf-8')
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._file.seek(0)
      holder = self._file.read().strip() or 'unknown'
      self._file.close()
      raise WorkdirBusyError(f'another process (pid {holder}) is training in {workdir}') from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(str(os.getpid()))
    self._file.flush()

  def release(self) -> None:
    if not self._file.closed:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()


def is_locked(workdir: str) -> bool:
  """Whether a process is training in `workdir` now (it holds WorkdirLock), e.g. a run that
  outlived a killed sweep runner and is still saving its checkpoint."""
  try:
    fd = os.open(os.path.join(workdir, LOCK), os.O_RDONLY)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return True
  finally:
    os.close(fd)  # closing drops the probe's own lock
  return False


def is_finished(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, SUMMARY))


def headline(evaluation: dict | None, metric: str | None = None) -> tuple[str | None, float | None]:
  """(name, value) of the metric that sums up an evaluation record: `metric` (the run's task's
  headline, recorded in model.json and summary.json) when the record has it; for a run from
  before tasks, accuracy when there is one, else its first metric other than the loss, else the
  loss."""
  evaluation = evaluation or {}
  names = [k for k in evaluation if k not in ('step', 'kind') and
           isinstance(evaluation[k], (int, float))]
  if not names:
    return None, None
  if metric in names:
    return metric, evaluation[metric]
  name = 'accuracy' if 'accuracy' in names else next((k for k in names if k != 'loss'), 'loss')
  return name, evaluation[name]


def headline_metric(workdir: str) -> str | None:
  """The run's headline metric as its model.json records it (None before tasks existed)."""
  return ((read_json(os.path.join(workdir, MODEL)) or {}).get('headline') or {}).get('metric')


def checkpoint_step(text: str) -> int | str:
  """A `--step` argument: a step number or 'best' (argparse type; None, the latest, is its
  default)."""
  if text == 'best':
    return text
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected a step number or "best", got {text!r}') from None


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
  """--run DIR and --step (default the latest checkpoint), as every command that loads a trained
  run takes them (cnnlab.load_run(args.run, args.step))."""
  parser.add_argument('--run', required=True, metavar='DIR',
                      help='a run directory (--workdir of cnnlab train)')
  parser.add_argument('--step', type=checkpoint_step, default=None,
                      help='checkpoint: a step number or "best" (default: the latest)')
