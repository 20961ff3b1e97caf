"""Run directories read back, without JAX: what each run is doing, and one run's pictures.

  cnnlab runs ROOT          one line per run under ROOT: state, step, headline metric, wall time
  cnnlab report RUN_DIR     one run's curves (loss, accuracy, learning rate against step, train
                            and eval) and, for classification, its confusion matrix and per-class
                            accuracy: RUN_DIR/report.md and RUN_DIR/plots/*.png

A run's state comes from its files (`cnnlab.workdir`): 'running' while a process holds its lock,
'finished' once summary.json exists, else how its last launch ended as provenance.json records it
('failed', 'preempted', 'interrupted'; a launch killed outright records nothing and reads as
'interrupted'), 'failed' when a sweep recorded error.json, and 'new' before any launch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Sequence

from cnnlab import workdir

STATES = ('running', *workdir.OUTCOMES, 'new')
_NOT_RUNS = (workdir.CHECKPOINTS, workdir.TENSORBOARD, 'plots')


@dataclasses.dataclass
class RunStatus:
  """What `cnnlab runs` shows of one run directory."""
  path: str
  state: str  # one of STATES
  step: int | None  # the last step logged (the run's length once finished)
  total_steps: int | None
  metric: str | None  # the headline metric's name (accuracy for classification)
  value: float | None  # its last evaluated value (the final one once finished)
  wall_time_s: float | None  # summed over launches; a running launch counts up to now
  error: str | None = None  # why the last launch failed


def is_run(path: str) -> bool:
  """Whether `path` is a run directory (one `cnnlab train` or `cnnlab sweep` has written)."""
  return any(os.path.exists(os.path.join(path, name))
             for name in (workdir.CONFIG, workdir.POINT, workdir.PROVENANCE))


def find(root: str) -> list[str]:
  """The run directories at or under `root`, in path order (a run's own folders not searched)."""
  if not os.path.isdir(root):
    raise ValueError(f'{root!r} is not a directory')
  if is_run(root):
    return [root]
  found = []
  for folder, subdirs, _ in os.walk(root):
    subdirs.sort()
    if folder != root and is_run(folder):
      found.append(folder)
      subdirs.clear()
    else:
      subdirs[:] = [d for d in subdirs if not d.startswith('.') and d not in _NOT_RUNS]
  return found


def status(path: str) -> RunStatus:
  summary = workdir.read_json(os.path.join(path, workdir.SUMMARY))
  launches = (workdir.read_json(os.path.join(path, workdir.PROVENANCE)) or {}).get('launches', [])
  last = launches[-1] if launches else {}
  known = workdir.headline_metric(path)
  if summary is not None:
    metric, value = workdir.headline(summary.get('final_eval'), known)
    return RunStatus(path, 'running' if workdir.is_locked(path) else 'finished',
                     summary.get('steps'), summary.get('steps'), metric, value,
                     summary.get('wall_time_s'))
  records = workdir.read_metrics(path)
  evaluations = [r for r in records if r.get('kind') == 'eval']
  metric, value = workdir.headline(evaluations[-1] if evaluations else None, known)
  steps = [int(r.get('step', 0)) for r in records]
  if last.get('end_step') is not None:
    steps.append(last['end_step'])
  step = max(steps, default=None)
  wall = sum(launch.get('wall_time_s') or 0.0 for launch in launches) or None
  error = (workdir.read_json(os.path.join(path, workdir.ERROR)) or {}).get('error')
  if workdir.is_locked(path):
    state = 'running'
    if 'started' in last and 'outcome' not in last:
      wall = (wall or 0.0) + time.time() - last['started']
  elif error is not None or last.get('outcome') == 'failed':
    state, error = 'failed', error or last.get('error')
  elif last.get('outcome') == 'preempted':
    state = 'preempted'
  elif launches:
    state = 'interrupted'  # ended by a signal, a kill, or before writing its summary
  else:
    state = 'new'
  return RunStatus(path, state, step, last.get('total_steps'), metric, value, wall, error)


def _clock(seconds: float | None) -> str:
  if seconds is None:
    return '—'
  minutes, s = divmod(int(round(seconds)), 60)
  hours, m = divmod(minutes, 60)
  return f'{hours}:{m:02d}:{s:02d}' if hours else f'{m}:{s:02d}'


def table(statuses: Sequence[RunStatus], root: str) -> str:
  """The aligned text table `cnnlab runs` prints, one line per run."""
  head = ('run', 'state', 'step', 'metric', 'wall')
  rows = []
  for st in statuses:
    name = os.path.relpath(st.path, root) if os.path.abspath(st.path) != os.path.abspath(root) \
        else os.path.basename(os.path.abspath(st.path))
    step = '—' if st.step is None else f'{st.step}/{st.total_steps or "?"}'
    metric = '—' if st.value is None else f'{st.metric} {st.value:.4f}'
    rows.append((name, st.state + (f' ({st.error})' if st.error else ''), step, metric,
                 _clock(st.wall_time_s)))
  widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head) - 1)]
  return '\n'.join('  '.join(cell.ljust(w) for cell, w in zip(r, widths)) + '  ' + r[-1]
                   for r in (head, *rows))


def read_metrics(path: str) -> list[dict]:
  """A run's metrics.jsonl records, the last one per (kind, step) (a resumed run may repeat
  steps), in step order."""
  records = {(r.get('kind'), r.get('step')): r for r in workdir.read_metrics(path)}
  return sorted(records.values(), key=lambda r: (r.get('step') or 0))


# ---- one run's report ----

def figure(width: float, height: float):
  """A matplotlib Figure on the Agg canvas: no pyplot, no global backend."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def finite(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_curves(path: str, out: str) -> str | None:
  """OUT: loss, headline metric and learning rate against step, train and eval; None when the
  run has logged nothing."""
  records = read_metrics(path)
  if not records:
    return None
  evals = [r for r in records if r.get('kind') == 'eval']
  metric = workdir.headline(evals[-1] if evals else None, workdir.headline_metric(path))[0] \
      or 'accuracy'
  panels = (('loss', 'loss'), (metric, metric), ('learning_rate', 'learning rate'))
  fig = figure(13, 3.4)
  for i, (key, label) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    for kind, style in (('train', '-'), ('eval', 'o-')):
      points = [(r['step'], r[key]) for r in records
                if r.get('kind') == kind and finite(r.get(key))]
      if points:
        ax.plot(*zip(*points), style, markersize=3, label=kind)
    ax.set(xlabel='step', ylabel=label)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.suptitle(os.path.basename(os.path.abspath(path)), fontsize=10)
  fig.tight_layout()
  fig.savefig(out)
  return out


def plot_confusion(matrix: Sequence[Sequence[int]], accuracy: Sequence[float | None], out: str,
                   title: str = '') -> str:
  """OUT: the confusion matrix (each row normalised by its class's count, rows the true class)
  beside the per-class accuracy."""
  import numpy as np
  counts = np.asarray(matrix, dtype=float)
  rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  k = len(counts)
  fig = figure(11, 4.8)
  ax = fig.add_subplot(1, 2, 1)
  image = ax.imshow(rates, cmap='Blues', vmin=0, vmax=1)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label='fraction of the true class')
  if k <= 20:
    for (i, j), n in np.ndenumerate(counts):
      if n:
        ax.text(j, i, str(int(n)), ha='center', va='center', fontsize=7,
                color='white' if rates[i, j] > 0.5 else 'black')
  ticks = range(k) if k <= 20 else range(0, k, max(1, k // 10))
  ax.set_xticks(list(ticks))
  ax.set_yticks(list(ticks))
  ax.set(xlabel='predicted class', ylabel='true class', title='confusion matrix')
  bars = fig.add_subplot(1, 2, 2)
  values = [np.nan if a is None else 100 * a for a in accuracy]
  bars.bar(range(k), values, color='tab:blue')
  bars.set(xlabel='class', ylabel='accuracy (%)', ylim=(0, 100), title='per-class accuracy')
  bars.set_xticks(list(ticks))
  bars.grid(alpha=0.3, axis='y')
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(out)
  return out


def write_report(path: str, *, plots: bool = True) -> dict[str, Any]:
  """One run's report.md and plots (plots/curves.png, plots/confusion.png) in the run directory;
  returns their paths and notes on what is missing."""
  st = status(path)
  summary = workdir.read_json(os.path.join(path, workdir.SUMMARY)) or {}
  config = workdir.read_json(os.path.join(path, workdir.CONFIG)) or {}
  name = os.path.basename(os.path.abspath(path))
  paths: dict[str, Any] = {'markdown': os.path.join(path, 'report.md'), 'plots': [], 'notes': []}
  if plots:
    os.makedirs(os.path.join(path, 'plots'), exist_ok=True)
    curves = plot_curves(path, os.path.join(path, 'plots', 'curves.png'))
    if curves:
      paths['plots'].append(curves)
    else:
      paths['notes'].append(f'{name}: no metrics logged yet, no curves')
  matrix = summary.get('confusion_matrix')
  if matrix is None and st.state == 'finished' and 'accuracy' in (summary.get('final_eval') or {}):
    paths['notes'].append(f'{name}: no confusion matrix recorded (more classes than the '
                          'evaluation counts, or a run older than the record)')
  # (a segmentation's matrix counts pixels: its per-class accuracy is the pixel accuracy)
  accuracy = summary.get('per_class_accuracy', summary.get('per_class_pixel_accuracy'))
  if matrix is not None and plots:
    paths['plots'].append(plot_confusion(matrix, accuracy,
                                         os.path.join(path, 'plots', 'confusion.png'), name))
  split = (config.get('data') or {}).get('eval_split', 'test')
  out = [f'# Run report: {name}', '',
         f'State: {st.state}' + (f' ({st.error})' if st.error else '') +
         (f', step {st.step}/{st.total_steps or "?"}' if st.step is not None else '') +
         (f', wall time {_clock(st.wall_time_s)}' if st.wall_time_s is not None else '') + '.', '']
  if config:
    model, data, train = (config.get(k) or {} for k in ('model', 'data', 'train'))
    out += [f"Model `{model.get('name')}` on `{data.get('name')}`, batch {train.get('batch_size')}"
            + (f", {summary['num_params']:,} parameters" if summary.get('num_params') else '')
            + (f", {summary['macs'] / 1e6:.1f} M MACs per example" if summary.get('macs') else '')
            + '.', '']
  for label, key in (('Final', 'final_eval'), ('Best', 'best_eval')):
    evaluation = summary.get(key)
    if evaluation:
      figures = ', '.join(f'{k} {v:.4f}' for k, v in evaluation.items()
                          if k != 'step' and finite(v))
      out.append(f'- {label} evaluation on `{split}` (step {evaluation.get("step")}): {figures}')
  if summary.get('images_per_sec'):
    times = {k: summary.get(f'{k}_time_s') or 0.0 for k in ('compile', 'train', 'eval')}
    out.append(f"- Training: {summary['images_per_sec']:.0f} images/s; compile "
               f"{times['compile']:.1f} s, train {times['train']:.1f} s, evaluation "
               f"{times['eval']:.1f} s over {len(summary.get('launches', [])) or 1} launch(es)")
  out.append('')
  for plot in paths['plots']:
    out += [f'![{os.path.basename(plot)[:-4]}]({os.path.relpath(plot, path)})', '']
  if accuracy is not None:
    support = [sum(row) for row in matrix]
    iou = summary.get('per_class_iou')
    unit = 'pixels' if iou is not None else 'examples'
    percent = lambda v: '—' if v is None else f'{100 * v:.2f}'  # noqa: E731
    out += [f'| class | {unit} | accuracy (%) |' + (' IoU (%) |' if iou else ''),
            '|---:|---:|---:|' + ('---:|' if iou else '')]
    out += [f'| {i} | {n} | {percent(a)} |' + (f' {percent(iou[i])} |' if iou else '')
            for i, (n, a) in enumerate(zip(support, accuracy))]
    out.append('')
  if paths['notes']:
    out += ['Missing:', '', *(f'- {note}' for note in paths['notes']), '']
  with open(paths['markdown'], 'w', encoding='utf-8') as f:
    f.write('\n'.join(out))
  return paths


__all__ = ['STATES', 'RunStatus', 'is_run', 'find', 'status', 'table', 'read_metrics',
           'write_report', 'plot_curves', 'plot_confusion', 'figure']
