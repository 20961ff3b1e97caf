"""Checkpoints with Orbax: WORKDIR/checkpoints/<step>/, async saves, exact resume, preemption.

A step directory holds three items, written by Orbax into `<step>.orbax-checkpoint-tmp-*` and
renamed to `<step>` only once every file is written (the rename is the commit, so a directory named
by its step is complete; anything else is a partial save, ignored and removed at the next start):
  state/    the TrainState as a pytree of arrays (StandardSave: tensorstore/OCDBT data + JSON
            metadata). No pickle anywhere, so restoring executes no code; restores go to an abstract
            target (shapes, dtypes, shardings), which is what lets a checkpoint written under one
            device count or strategy load under another.
  loop/     JSON: what the loop needs to continue bit for bit: the per-step train metrics since the
            last metrics.jsonl line (as raw bits) and the evaluations so far.
  metrics/  JSON: the evaluation of exactly this state, when the step had one (ranks the best).

Retention keeps the last `checkpoint.keep` checkpoints plus the best by `checkpoint.best_metric`
among those that carry an evaluation; the loop saves at every evaluation that improves the best,
so the best evaluated state is always on disk. Metrics live in the step directories, so retention
is right after a restart. Deletion is a rename into checkpoints/.deleted/ (emptied at the next
save): a kill mid-deletion cannot leave a half-deleted step that looks committed.

Preemption (cnnlab.train.resume.PreemptionWatch): SIGTERM -> the loop finishes the step, saves,
waits for the write and raises `Preempted`, a SystemExit with code workdir.EXIT_PREEMPTED = 75
(EX_TEMPFAIL) so launchers requeue; the next launch resumes. A failed asynchronous write raises
CheckpointWriteError at the next save or at the end; the previous committed checkpoint is untouched.
Restoring (and so cnnlab.inference.load_run) refuses symlinks, paths leaving the workdir and
pickle-like files.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from cnnlab.workdir import CHECKPOINTS, EXIT_PREEMPTED, UnsafeCheckpointError, safe_join

COMMIT_FILE = 'commit_success.txt'  # Orbax writes it last, before the rename that commits a step
TMP_MARKER = '.orbax-checkpoint-tmp'
DELETED_DIR = '.deleted'
ITEMS = ('state', 'loop')


class Preempted(SystemExit):
  """SIGTERM was honoured: the state at `step` is committed. Exits the process with
  EXIT_PREEMPTED (75) unless caught; relaunching the same command resumes."""

  def __init__(self, step: int, workdir: str):
    super().__init__(EXIT_PREEMPTED)
    self.step, self.workdir = step, workdir

  def __str__(self) -> str:
    return (f'preempted: checkpoint at step {self.step} committed in {self.workdir}; '
            f'relaunch the same command to resume (exit code {EXIT_PREEMPTED})')


class CheckpointShapeError(ValueError):
  """A checkpoint's tensors do not fit the state of the config being resumed."""


class CheckpointWriteError(RuntimeError):
  """An (asynchronous) checkpoint write failed; earlier committed checkpoints are intact."""


# ---- paths ----

_PICKLE_SUFFIXES = ('.pkl', '.pickle', '.npy', '.npz', '.pt', '.pth', '.joblib')


def verify_step_dir(path: str) -> None:
  """Refuses a step directory holding a symlink or anything pickle-like (by name, or by the
  pickle protocol header) before Orbax opens it. Orbax itself reads only JSON and tensorstore
  data for the items cnnlab writes; this check is the belt to those braces."""
  if os.path.islink(path):
    raise UnsafeCheckpointError(f'{path} is a symlink; checkpoints must be real directories')
  for folder, dirs, files in os.walk(path):
    for name in dirs + files:
      full = os.path.join(folder, name)
      if os.path.islink(full):
        raise UnsafeCheckpointError(f'{full} is a symlink; refusing to load the checkpoint')
    for name in files:
      full = os.path.join(folder, name)
      with open(full, 'rb') as f:
        head = f.read(2)
      pickle_header = len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # PROTO opcode
      if name.endswith(_PICKLE_SUFFIXES) or pickle_header:
        raise UnsafeCheckpointError(
            f'{full} looks like a pickle; cnnlab checkpoints hold only arrays and JSON, and '
            'loading never unpickles (it could run arbitrary code). Refusing to load.')


def path_name(path) -> str:
  """'params/stage1_conv1/conv/kernel' for a pytree path of attribute, dict or sequence keys."""
  names = []
  for key in path:
    for attr in ('name', 'key', 'idx'):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return '/'.join(names)


def _is_committed(directory: str, name: str) -> bool:
  # A symlinked step counts here, so that restoring it is refused loudly (verify_step_dir).
  path = os.path.join(directory, name)
  return name.isdigit() and os.path.isdir(path) and os.path.isfile(os.path.join(path, COMMIT_FILE))


def clean_partial_saves(directory: str) -> list[str]:
  """Removes what a killed process leaves in a checkpoints directory: temporary step directories,
  step directories without their commit file, and the deletion area. Returns the removed names."""
  removed = []
  if not os.path.isdir(directory):
    return removed
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    uncommitted = name.isdigit() and not _is_committed(directory, name)
    if TMP_MARKER in name or name == DELETED_DIR or uncommitted:
      if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
      else:
        shutil.rmtree(path)
      removed.append(name)
  return removed


# ---- the manager ----

class Checkpointer:
  """Saving and restoring one run's TrainState (and the loop's JSON record) in WORKDIR/checkpoints.

  Writers (read_only=False) first remove partial saves left by a killed process. Every listing
  only counts committed steps.
  """

  def __init__(self, workdir: str, *, keep: int = 2, best_metric: str | None = None,
               best_mode: str = 'max', read_only: bool = False):
    self.directory = os.path.abspath(safe_join(workdir, CHECKPOINTS))
    self.best_metric, self.best_mode, self.read_only = best_metric or None, best_mode, read_only
    self._failed, self._writing = False, None  # _writing: the step of the save in flight
    self.removed: list[str] = []  # partial saves this writer found and removed
    if not read_only and jax.process_index() == 0:
      self.removed = clean_partial_saves(self.directory)
    preserve = [policies.LatestN(n=keep)]
    best_fn = None
    if self.best_metric:
      best_fn = lambda metrics: metrics[self.best_metric]  # noqa: E731
      preserve.append(policies.BestN(get_metric_fn=best_fn, reverse=best_mode == 'min', n=1,
                                     keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(preserve), best_fn=best_fn,
        best_mode=best_mode, create=not read_only, read_only=read_only,
        enable_async_checkpointing=True, todelete_subdir=None if read_only else DELETED_DIR)
    handlers = {'state': ocp.StandardCheckpointHandler(), 'loop': ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS,
                                         item_handlers=handlers, options=options)

  # -- listing --

  def all_steps(self) -> list[int]:
    """Committed steps, ascending (read from the directory: the truth after a failed save)."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory) if _is_committed(self.directory, n))

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def metrics(self, step: int) -> dict | None:
    """The evaluation saved with `step` (None when the step had none)."""
    return self.manager.metrics(step)

  def best_step(self) -> int | None:
    """The committed step with the best `best_metric` among those with an evaluation (the later
    one on ties); None when none has one."""
    if not self.best_metric:
      return None
    scored = [(m[self.best_metric], s) for s in self.all_steps()
              if (m := self.metrics(s)) is not None and self.best_metric in m]
    if not scored:
      return None
    sign = 1 if self.best_mode == 'max' else -1
    return max(scored, key=lambda vs: (sign * vs[0], vs[1]))[1]

  # -- saving --

  def save(self, step: int, state, *, loop: dict | None = None,
           metrics: dict | None = None) -> None:
    """Starts an asynchronous save of `state` at `step` (returns once the arrays are copied off the
    device). Raises CheckpointWriteError if a previous asynchronous write failed."""
    self.wait()  # surfaces the previous write's error before anything else is written
    if step in self.all_steps():
      return
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              loop=ocp.args.JsonSave(loop or {}))
    self._writing = step
    try:
      self.manager.save(step, args=args, metrics=metrics, force=True)
    except Exception as e:
      self._failed = True
      raise CheckpointWriteError(self._write_message(e)) from e

  def wait(self) -> None:
    """Blocks until the pending write is committed; raises CheckpointWriteError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._failed = True
      raise CheckpointWriteError(self._write_message(e)) from e
    self._writing = None
    if not self.read_only and jax.process_index() == 0:  # what retention renamed away
      shutil.rmtree(os.path.join(self.directory, DELETED_DIR), ignore_errors=True)

  def _write_message(self, error: BaseException) -> str:
    latest = self.latest_step()
    what = 'a save' if self._writing is None else f'step {self._writing}'
    kept = (f'the last committed checkpoint, step {latest}, is intact' if latest is not None
            else 'no checkpoint was committed')
    return f'writing checkpoint ({what}) into {self.directory} failed: {error!r}; {kept}'

  # -- restoring --

  def restore(self, target, step: int | None = None) -> tuple[Any, dict]:
    """(state, loop record) saved at `step` (default: latest), laid out like `target` (arrays or
    jax.ShapeDtypeStruct with shardings): any device count or strategy."""
    step = self._check_step(step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), loop=ocp.args.JsonRestore()))
    return restored['state'], restored['loop']

  def check_shapes(self, target, step: int | None = None) -> None:
    """Raises CheckpointShapeError naming every tensor whose saved shape differs from `target`'s
    (a changed model resumed with checkpoint.allow_config_change), and those only one side has;
    nothing is restored or written."""
    step = self._check_step(step)
    saved = {path_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(
        self.manager.item_metadata(step)['state'])[0] if hasattr(m, 'shape')}
    wanted = {path_name(p): tuple(x.shape) for p, x in
              jax.tree_util.tree_flatten_with_path(target)[0]}
    problems = [f'{k}: saved {saved[k]}, the model has {wanted[k]}' for k in sorted(saved)
                if k in wanted and saved[k] != wanted[k]]
    problems += [f'{k}: saved, not in the model' for k in sorted(set(saved) - set(wanted))]
    problems += [f'{k}: in the model, not saved' for k in sorted(set(wanted) - set(saved))]
    if problems:
      shown = '\n  '.join(problems[:10]) + (f'\n  ... {len(problems) - 10} more'
                                               if len(problems) > 10 else '')
      raise CheckpointShapeError(
          f'the checkpoint at step {step} in {self.directory} does not fit this config\'s model '
          f'and optimizer ({len(problems)} tensors):\n  {shown}\nThe run directory is unchanged; '
          'train the changed model in a new --workdir')

  def restore_arrays(self, step: int | None = None) -> dict:
    """The saved state as nested dicts of arrays on the first local device, shaped from the
    checkpoint's own metadata (no model or optimizer needed; any saved layout)."""
    step = self._check_step(step)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = self.manager.item_metadata(step)['state']
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            metadata)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    return restored['state']

  def _check_step(self, step: int | None) -> int:
    steps = self.all_steps()
    step = (steps[-1] if steps else None) if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f'no committed checkpoint in {self.directory}')
    if step not in steps:
      raise FileNotFoundError(f'no committed checkpoint for step {step} in {self.directory} '
                              f'(committed: {steps})')
    verify_step_dir(safe_join(self.directory, str(step)))
    return step

  def close(self) -> None:
    """Waits for the pending write (raising its error, unless one was already raised)."""
    try:
      if not self._failed:
        self.wait()
      self.manager.close()
    except Exception as e:
      if not self._failed:
        self._failed = True
        raise CheckpointWriteError(self._write_message(e)) from e
