"""What a run writes as it goes: metrics.jsonl (the source of truth), TensorBoard events, progress.

Only process 0 writes. metrics.jsonl holds one JSON object per line:
  {"kind": "train", "step": 50, "loss": ..., "accuracy": ..., "learning_rate": ...,
   "images_per_sec": ..., "step_time_s": ..., ...}
  {"kind": "eval", "step": 100, "loss": ..., "accuracy": ...}
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax

from cnnlab import workdir as workdir_lib


class MetricWriter:
  """Appends metric records to WORKDIR/metrics.jsonl and (optionally) TensorBoard."""

  def __init__(self, workdir: str, tensorboard: bool = True, purge_step: int | None = None):
    """purge_step: a resumed run's first step; TensorBoard drops events a killed run logged from
    there on (metrics.jsonl is truncated by the checkpoint code)."""
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, workdir_lib.METRICS)
    self._file = open(self.path, 'a', encoding='utf-8') if self.enabled else None
    self._tb = None
    if self.enabled and tensorboard:
      from tensorboardX import SummaryWriter  # no TensorFlow needed
      self._tb = SummaryWriter(logdir=os.path.join(workdir, workdir_lib.TENSORBOARD),
                               purge_step=purge_step)

  def write(self, kind: str, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {'kind': kind, 'step': int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key not in ('kind', 'step') and isinstance(value, (int, float)):
          self._tb.add_scalar(f'{kind}/{key}', value, step)

  def write_images(self, step: int, images: dict) -> None:
    """TensorBoard images {tag: uint8 (H, W, 3)} at `step` (log.images); nothing without
    TensorBoard (metrics.jsonl holds numbers only)."""
    if self._tb is not None:
      for tag, image in images.items():
        self._tb.add_image(tag, image, step, dataformats='HWC')
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def _plain(v):
  v = float(v) if hasattr(v, '__float__') and not isinstance(v, (int, bool)) else v
  return None if isinstance(v, float) and not math.isfinite(v) else v


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}' if seconds >= 3600 \
      else f'{seconds // 60}:{seconds % 60:02d}'


# The train step's own records (the rest of a record is the task's metrics, e.g. accuracy).
NOT_SHOWN = ('loss', 'learning_rate', 'grad_norm', 'nonfinite', 'skips', 'loss_scale',
             'images_per_sec', 'step_time_s')
# Train metrics as the progress line abbreviates them.
SHORT = {'accuracy': 'acc', 'pixel_accuracy': 'pixel acc', 'box_iou': 'iou'}


class Progress:
  """What the terminal shows while training: a bar (rich) on a terminal, lines otherwise.

  Each log interval shows the step, loss, the task's train metrics (e.g. accuracy) and images/s with the elapsed time and an estimate of the time left (from the steps
  of this launch); each evaluation shows its metrics, and the bar keeps the latest one in view.
  """

  def __init__(self, total_steps: int, start_step: int = 0, mode: str = 'auto'):
    self.total, self.start = total_steps, start_step
    self.enabled = jax.process_index() == 0 and mode != 'none'
    self.bar, self.latest_eval, self.info = None, '', ''
    if self.enabled and (mode == 'bar' or (mode == 'auto' and sys.stderr.isatty())):
      from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                 TextColumn, TimeElapsedColumn, TimeRemainingColumn)
      self.bar = RichProgress(TextColumn('train'), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), TextColumn('eta'), TimeRemainingColumn(),
                              TextColumn('{task.fields[info]}'), transient=False)
      self.task = self.bar.add_task('train', total=total_steps, completed=start_step, info='')
      self.bar.start()
    self.started = time.time()

  def advance(self, step: int) -> None:
    """Every step (cheap: no host sync): moves the bar, so its estimate starts at once."""
    if self.bar is not None:
      self.bar.update(self.task, completed=step)

  def train(self, step: int, record: dict) -> None:
    """A log interval's averages (loss, the task's metrics, images_per_sec)."""
    if not self.enabled:
      return
    figures = [f"loss {record['loss']:.4f}",
               *(f'{SHORT.get(k, k)} {v:.3f}' for k, v in record.items() if k not in NOT_SHOWN),
               f"{record['images_per_sec']:.0f} img/s"]
    self.info = '  '.join(figures)
    self._show(step)

  def evaluated(self, step: int, result: dict) -> None:
    if not self.enabled:
      return
    self.latest_eval = '  '.join(f'{k} {v:.4f}' for k, v in result.items()
                                 if isinstance(v, float))
    if self.bar is not None:
      self._show(step)
    else:
      print(f'eval  step {step}/{self.total}  {self.latest_eval}', file=sys.stderr, flush=True)

  def _show(self, step: int) -> None:
    if self.bar is not None:
      evaluation = f'  | eval {self.latest_eval}' if self.latest_eval else ''
      self.bar.update(self.task, completed=step, info=self.info + evaluation)
      return
    elapsed = time.time() - self.started
    done = step - self.start
    eta = elapsed / done * (self.total - step) if done else float('nan')
    print(f'train step {step}/{self.total}  {self.info}  elapsed {_clock(elapsed)}  '
          f'eta {_clock(eta) if math.isfinite(eta) else "?"}', file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.stop()
