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


class MetricWriter:
  """Appends metric records to WORKDIR/metrics.jsonl and (optionally) TensorBoard."""

  def __init__(self, workdir: str, tensorboard: bool = True, purge_step: int | None = None):
    """purge_step: a resumed run's first step; TensorBoard drops events a killed run logged from
    there on (metrics.jsonl is truncated by the checkpoint code)."""
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._file = open(self.path, 'a', encoding='utf-8') if self.enabled else None
    self._tb = None
    if self.enabled and tensorboard:
      from tensorboardX import SummaryWriter  # no TensorFlow needed
      self._tb = SummaryWriter(logdir=os.path.join(workdir, 'tensorboard'), purge_step=purge_step)

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

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def _plain(v):
  v = float(v) if hasattr(v, '__float__') and not isinstance(v, (int, bool)) else v
  return None if isinstance(v, float) and not math.isfinite(v) else v


def read_metrics(workdir: str) -> list[dict]:
  """Records of WORKDIR/metrics.jsonl, in order."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """A progress bar with throughput and ETA on a terminal, plain lines otherwise."""

  def __init__(self, total_steps: int, start_step: int = 0, mode: str = 'auto'):
    self.total = total_steps
    self.enabled = jax.process_index() == 0 and mode != 'none'
    tty = sys.stderr.isatty()
    self.bar = None
    if self.enabled and (mode == 'bar' or (mode == 'auto' and tty)):
      from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                 TextColumn, TimeRemainingColumn)
      self.bar = RichProgress(TextColumn('train'), BarColumn(), MofNCompleteColumn(),
                              TextColumn('{task.fields[info]}'), TimeRemainingColumn(),
                              transient=False)
      self.task = self.bar.add_task('train', total=total_steps, completed=start_step, info='')
      self.bar.start()
    self.started = time.time()

  def update(self, step: int, text: str) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.update(self.task, completed=step, info=text)
    else:
      print(f'step {step}/{self.total}  {text}', file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.stop()
