"""`cnnlab report ROOT`: a sweep's runs as one table (seeds aggregated) and plots.

Writes into ROOT:
  results.csv   one row per configuration: the swept values, number of seeds, mean and sample
                standard deviation (over seeds) of the final evaluation's headline metric and
                loss, parameters, MACs per example, receptive field, wall time and images/s per
                run.
  report.md     the same table, the sweep's command and wall time, failed and unfinished runs.
  plots/<metric>_vs_<key>.png   the headline metric against each swept key: one line per
                combination of the other keys, error bars = std over seeds.
  plots/curves/<configuration>.png   training loss and the evaluation's headline metric per step,
                one line per seed.

The headline metric is the runs' task's (cnnlab.tasks: accuracy for classification, mIoU for
segmentation, ...) or their `checkpoint.best_metric`.

A configuration is a point of the sweep without its seed. The swept keys come from each run's
point.json (written by `cnnlab sweep`); for run directories made otherwise they are the config
keys whose values differ between the runs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import statistics
from typing import Any, Sequence

from cnnlab import runs as runs_lib, workdir
from cnnlab.sweeps import plan as sweep
from cnnlab.tasks import names as task_names

CSV_FIELDS = ('{metric}_mean', '{metric}_std', 'loss_mean', 'loss_std', 'seeds', 'params', 'macs',
              'receptive_field', 'wall_time_s', 'images_per_sec', 'runs')


def csv_fields(metric: str) -> list[str]:
  """results.csv's columns after the swept keys, for the runs' headline `metric`."""
  return [field.format(metric=metric) for field in CSV_FIELDS]


@dataclasses.dataclass
class RunDir:
  """One run directory of a sweep root."""
  name: str
  path: str
  overrides: dict[str, Any]
  config: dict[str, Any] | None  # config.json
  summary: dict[str, Any] | None  # summary.json: present once the run finished
  error: dict[str, Any] | None  # error.json: the last attempt failed

  @property
  def seed(self):
    return self.overrides.get(sweep.SEED_KEY, (self.config or {}).get(sweep.SEED_KEY))


@dataclasses.dataclass
class Row:
  """One configuration: its swept values (seed excluded) and its runs' aggregates."""
  values: dict[str, Any]
  runs: list[RunDir]
  metric: str  # the headline metric (accuracy, miou, ...)
  metric_mean: float
  metric_std: float | None  # None with one seed
  loss_mean: float | None  # None: the task's evaluation has no loss (a detector's)
  loss_std: float | None
  params: int | None
  macs: int | None
  receptive_field: float | tuple[float, float] | None
  wall_time_s: float
  images_per_sec: float | None
  notes: list[str] = dataclasses.field(default_factory=list)  # why a figure is missing

  @property
  def name(self) -> str:
    return sweep.run_name(self.values)

  @property
  def seeds(self) -> int:
    return len(self.runs)


def collect(root: str) -> list[RunDir]:
  """Every run directory under `root` (one holding point.json or config.json), in sweep order."""
  if not os.path.isdir(root):
    raise ValueError(f'{root!r} is not a directory')
  runs = []
  for name in sorted(os.listdir(root)):
    path = os.path.join(root, name)
    point = workdir.read_json(os.path.join(path, workdir.POINT))
    config = workdir.read_json(os.path.join(path, workdir.CONFIG))
    if point is None and config is None:
      continue
    runs.append(RunDir(name, path, dict(point['overrides']) if point else None, config,
                       workdir.read_json(os.path.join(path, workdir.SUMMARY)),
                       workdir.read_json(os.path.join(path, workdir.ERROR))))
  _derive_overrides(runs)
  record = workdir.read_json(os.path.join(root, sweep.RECORD_FILE)) or {}
  order = {p['name']: p['index'] for p in record.get('points', [])}
  return sorted(runs, key=lambda r: (order.get(r.name, len(order)), r.name))


# Keys that change how a run is logged or saved, not what it computes: never columns of a table.
NOT_COMPARED = ('train.log_every_steps', 'train.eval_every_steps', 'checkpoint')


def _derive_overrides(runs: list[RunDir]) -> None:
  """For runs without point.json: the config keys whose values differ between runs (those of
  sweep.IGNORED_KEYS and NOT_COMPARED aside)."""
  bare = [r for r in runs if r.overrides is None]
  if not bare:
    return
  flat = [sweep.fingerprint(r.config, (*sweep.IGNORED_KEYS, *NOT_COMPARED))
          for r in runs if r.config is not None]
  keys = sorted({k for f in flat for k in f if any(g.get(k) != f.get(k) for g in flat)})
  for run in bare:
    values = sweep.fingerprint(run.config)
    run.overrides = {k: values.get(k) for k in keys}


def swept_keys(runs: Sequence[RunDir]) -> list[str]:
  """The keys set by any run's point, in order of first appearance, seed excluded."""
  keys = {}
  for run in runs:
    keys.update(dict.fromkeys(k for k in run.overrides if k != sweep.SEED_KEY))
  return list(keys)


def _key(value) -> str:
  return json.dumps(value, sort_keys=True, default=repr)


def headline(runs: Sequence[RunDir]) -> tuple[str, str]:
  """(metric, 'max' | 'min') that sums the runs up: their task's headline (the first run with
  a config decides; a sweep changes settings, not the task)."""
  config = next((r.config for r in runs if r.config is not None), {})
  metric, mode = task_names.headline(config)
  return metric or task_names.HEADLINES[task_names.task_name(config)][0], mode


def aggregate(runs: Sequence[RunDir]) -> tuple[list[str], list[Row]]:
  """(swept keys, one Row per configuration with at least one finished run)."""
  keys = swept_keys(runs)
  metric = headline(runs)[0]
  groups: dict[str, list[RunDir]] = {}
  for run in runs:
    if run.summary is not None and (run.summary.get('final_eval') or {}).get(metric) is not None:
      groups.setdefault(_key([run.overrides.get(k) for k in keys]), []).append(run)
  rows, cache = [], {}
  for members in groups.values():
    values = {k: members[0].overrides.get(k) for k in keys}
    finals = [r.summary['final_eval'] for r in members]
    acc, loss = [f[metric] for f in finals], [f['loss'] for f in finals if 'loss' in f]
    speeds = [r.summary.get('images_per_sec') for r in members if r.summary.get('images_per_sec')]
    macs, rf, note = _figures(members[0], cache)
    rows.append(Row(values, members, metric, statistics.fmean(acc), _std(acc),
                    statistics.fmean(loss) if loss else None, _std(loss),
                    members[0].summary.get('num_params'), macs, rf,
                    statistics.fmean(r.summary.get('wall_time_s') or 0.0 for r in members),
                    statistics.fmean(speeds) if speeds else None, [note] if note else []))
  return keys, rows


def _std(values: Sequence[float]) -> float | None:
  return statistics.stdev(values) if len(values) > 1 else None


def _figures(run: RunDir, cache: dict) -> tuple[int | None, Any, str | None]:
  """(MACs per example, receptive field, why they are missing or None) of a run's model: as the
  run recorded them when it trained (summary.json, model.json); for a run older than those
  records, computed abstractly from its config when the model can be built here."""
  recorded = run.summary if run.summary and 'macs' in run.summary else workdir.read_json(
      os.path.join(run.path, workdir.MODEL))
  if recorded is not None and 'macs' in recorded:
    macs, rf = recorded.get('macs'), recorded.get('receptive_field')
    note = None if macs is not None else (
        f'{run.name}: no MACs or receptive field: the analysis could not follow the model '
        f"({recorded.get('analysis_error', 'no reason recorded')})")
    return macs, _rf_value(rf), note
  if run.config is None:
    return None, None, f'{run.name}: no MACs or receptive field: no config.json'
  structure = _key({k: v for k, v in sweep.fingerprint(run.config).items()
                    if k.startswith(('model.', 'data.'))})
  if structure not in cache:
    cache[structure] = _analysis(run.config)
  macs, rf, problem = cache[structure]
  return macs, rf, problem and f'{run.name}: no MACs or receptive field: {problem}'


def _analysis(config: dict) -> tuple[int | None, Any, str | None]:
  """(MACs, receptive field, problem) of a config's model, computed abstractly."""
  try:
    from cnnlab import analysis, config as config_lib, data, models, tasks
    c = config_lib.from_json(json.dumps(config))
    info = data.info(c.data.name, data_dir=c.data.data_dir, image_size=c.data.image_size,
                     **data.builder_kwargs(c.data))
    num_classes = c.model.num_classes or tasks.get(tasks.task_name(c)).model_classes(info)
    summary = analysis.summarize(models.from_config(c, num_classes), info.image_shape)
  except Exception as e:  # noqa: BLE001 - the table still has the runs' own numbers
    return None, None, f'{type(e).__name__}: {e}'
  return summary.total_macs, _rf_value(summary.receptive_field), None


def _rf_value(rf):
  if rf is None:
    return None
  return rf[0] if rf[0] == rf[1] else tuple(rf)


# ---- writing ----

def write(root: str, *, plots: bool = True) -> dict[str, Any]:
  """Writes results.csv, report.md and (with plots) the PNGs into `root`; returns their paths."""
  runs = collect(root)
  keys, rows = aggregate(runs)
  if not rows:
    states = ', '.join(f'{r.name}: {"failed" if r.error else "unfinished"}' for r in runs[:5])
    raise ValueError(f'no finished runs in {root!r}' + (f' ({states})' if states else ''))
  paths = {'csv': os.path.join(root, 'results.csv'), 'markdown': os.path.join(root, 'report.md'),
           'plots': []}
  _write_csv(paths['csv'], keys, rows)
  if plots:
    paths['plots'] = plot_metric(root, keys, rows) + plot_curves(root, rows)
  with open(paths['markdown'], 'w', encoding='utf-8') as f:
    f.write(markdown(root, keys, rows, runs, paths['plots']))
  paths['notes'] = [note for row in rows for note in row.notes]
  return paths


def _write_csv(path: str, keys: Sequence[str], rows: Sequence[Row]) -> None:
  with open(path, 'w', newline='', encoding='utf-8') as f:
    out = csv.writer(f)
    out.writerow([*keys, *csv_fields(rows[0].metric)])
    for row in rows:
      cells = [row.metric_mean, row.metric_std, row.loss_mean, row.loss_std, row.seeds,
               row.params, row.macs, _rf(row.receptive_field), row.wall_time_s, row.images_per_sec,
               ' '.join(r.name for r in row.runs)]
      out.writerow([*(_cell(row.values[k]) for k in keys), *('' if c is None else c for c in cells)])


def _cell(value) -> str:
  return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)


def _rf(rf) -> str | None:
  if rf is None:
    return None
  return 'x'.join(map(_num, rf)) if isinstance(rf, tuple) else _num(rf)


def _num(v: float) -> str:
  return str(int(v)) if float(v).is_integer() else f'{v:.1f}'


def _pm(mean: float | None, std: float | None, scale: float, digits: int) -> str:
  if mean is None:
    return '—'
  return f'{mean * scale:.{digits}f}' + ('' if std is None else f' ± {std * scale:.{digits}f}')


def _short(n: int | None) -> str:
  if n is None:
    return '—'
  for unit, size in (('G', 1e9), ('M', 1e6), ('k', 1e3)):
    if n >= size:
      return f'{n / size:.2f}{unit}'
  return str(n)


def column_names(keys: Sequence[str]) -> list[str]:
  """Each key's shortest dotted suffix that no other key ends with: `kernel_size` for
  model.kernel_size, but `model.name` and `data.name` when both are keys."""
  names = []
  for key in keys:
    parts = key.split('.')
    for n in range(1, len(parts) + 1):
      name = '.'.join(parts[-n:])
      if not any(other != key and (other == name or other.endswith('.' + name)) for other in keys):
        break
    names.append(name)
  return names


def markdown_table(keys: Sequence[str], rows: Sequence[Row], split: str = 'test') -> str:
  label, scale, digits = task_names.display(rows[0].metric)
  head = [*column_names(keys), 'seeds', f'{split} {label}',
          f'{split} loss', 'params', 'MACs', 'RF', 'wall (s)', 'images/s']
  pick = min if rows[0].metric in task_names.LOWER_IS_BETTER else max
  best = pick(r.metric_mean for r in rows)
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(keys) + '---:|' * (len(head) - len(keys))]
  for row in rows:
    acc = _pm(row.metric_mean, row.metric_std, scale, digits)
    cells = [*(_cell(row.values[k]) for k in keys), str(row.seeds),
             f'**{acc}**' if row.metric_mean == best else acc, _pm(row.loss_mean, row.loss_std, 1, 4),
             '—' if row.params is None else f'{row.params:,}', _short(row.macs),
             _rf(row.receptive_field) or '—',
             f'{row.wall_time_s:.1f}', '—' if row.images_per_sec is None else f'{row.images_per_sec:.0f}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def markdown(root: str, keys, rows: Sequence[Row], runs: Sequence[RunDir], plots: Sequence[str]) -> str:
  record = workdir.read_json(os.path.join(root, sweep.RECORD_FILE)) or {}
  split = (rows[0].runs[0].config or {}).get('data', {}).get('eval_split', 'test')
  finished = sum(len(r.runs) for r in rows)
  failed = [r for r in runs if r.summary is None and r.error is not None]
  unfinished = [r for r in runs if r.summary is None and r.error is None]
  out = [f'# Sweep report: {os.path.basename(os.path.abspath(root))}', '']
  if record.get('command'):
    out += ['```bash', record['command'], '```', '']
  sessions = record.get('sessions', [])
  wall = sum(s.get('wall_time_s', 0.0) for s in sessions)
  out.append(f'{len(rows)} configurations, {finished} finished runs, {len(failed)} failed, '
             f'{len(unfinished)} unfinished.' + (
                 f' Sweep wall time {wall / 60:.1f} min (summed over {len(sessions)} launch(es); '
                 f'the runs themselves: {sum(r.summary["wall_time_s"] for row in rows for r in row.runs) / 60:.1f} '
                 'min of run time).' if sessions else ''))
  out += ['', markdown_table(keys, rows, split), '',
          f'Final evaluation on the `{split}` split: mean ± sample standard deviation over seeds '
          '(no ± with one seed); the best mean is bold. MACs per example and the receptive field '
          '(in input pixels, of the last spatial layer) are computed from the model; wall time '
          '(compilation included) and images/s (training steps only) are means per run.', '']
  notes = [note for row in rows for note in row.notes]
  if notes:
    out += ['Figures missing:', '', *(f'- {note}' for note in notes), '']
  metric_plots = [p for p in plots if os.path.basename(p).startswith(f'{rows[0].metric}_vs_')]
  for path in metric_plots:
    rel = os.path.relpath(path, root)
    out += [f'![{os.path.basename(path)[:-4]}]({rel})', '']
  curves = [p for p in plots if p not in metric_plots]
  if curves:
    out += ['Training curves: ' + ', '.join(
        f'[{os.path.basename(p)[:-4]}]({os.path.relpath(p, root)})' for p in curves), '']
  if failed:
    out += ['## Failed runs', '']
    out += [f'- `{r.name}`: {r.error.get("error")} (log: `{r.name}/{workdir.LOG}`)' for r in failed]
    out.append('')
  if unfinished:
    out += ['## Unfinished runs', '', ', '.join(f'`{r.name}`' for r in unfinished), '']
  return '\n'.join(out)


# ---- plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend) ----

def _numeric(values) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_metric(root: str, keys: Sequence[str], rows: Sequence[Row]) -> list[str]:
  """plots/<metric>_vs_<key>.png for each swept key: one line per combination of the others."""
  os.makedirs(os.path.join(root, 'plots'), exist_ok=True)
  split = (rows[0].runs[0].config or {}).get('data', {}).get('eval_split', 'test')
  metric = rows[0].metric
  label, scale, _ = task_names.display(metric)
  paths, names = [], dict(zip(keys, column_names(keys)))
  for key in keys:
    others = [k for k in keys if k != key]
    xs = list(dict.fromkeys(_key(r.values[key]) for r in rows))  # sweep order
    values = [json.loads(x) for x in xs]
    numeric = _numeric(values)
    position = {x: (v if numeric else i) for i, (x, v) in enumerate(zip(xs, values))}
    lines: dict[str, list[Row]] = {}
    for row in rows:
      lines.setdefault(_key([row.values[k] for k in others]), []).append(row)
    fig = runs_lib.figure(7.5 if len(lines) > 1 else 5.5, 4)
    ax = fig.add_subplot()
    for members in lines.values():
      members = sorted(members, key=lambda r: position[_key(r.values[key])])
      label = ', '.join(f'{names[k]}={_cell(members[0].values[k])}' for k in others)
      ax.errorbar([position[_key(r.values[key])] for r in members],
                  [scale * r.metric_mean for r in members],
                  yerr=[scale * (r.metric_std or 0.0) for r in members],
                  marker='o', capsize=3, label=label or None)
    leaf = names[key]
    if numeric:
      ax.set_xticks(sorted(set(values)))
    else:
      ax.set_xticks(range(len(values)), [_cell(v) for v in values])
    ax.set_xlabel(leaf)
    ax.set_ylabel(f'{split} {label}')
    ax.set_title(f'{split} {metric} against {leaf} (mean ± std over seeds)', fontsize=10)
    ax.grid(alpha=0.3)
    if others:
      ax.legend(fontsize=7, loc='center left', bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    path = os.path.join(root, 'plots', f'{metric}_vs_{leaf}.png')
    fig.savefig(path)
    paths.append(path)
  return paths


def plot_curves(root: str, rows: Sequence[Row]) -> list[str]:
  """plots/curves/<configuration>.png: train loss and the eval headline metric per step, a line
  per seed."""
  os.makedirs(os.path.join(root, 'plots', 'curves'), exist_ok=True)
  paths = []
  for row in rows:
    fig = runs_lib.figure(9, 3.2)
    loss_ax, acc_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for run in row.runs:
      records = runs_lib.read_metrics(run.path)
      label = f'seed {run.seed}'
      for ax, kind, metric in ((loss_ax, 'train', 'loss'), (acc_ax, 'eval', row.metric)):
        points = [(r['step'], r[metric]) for r in records
                  if r.get('kind') == kind and runs_lib.finite(r.get(metric))]
        if points:
          ax.plot(*zip(*points), marker='.' if kind == 'eval' else None, label=label)
    loss_ax.set(xlabel='step', ylabel='train loss')
    acc_ax.set(xlabel='step', ylabel=f'eval {row.metric}')
    for ax in (loss_ax, acc_ax):
      ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=7)
    fig.suptitle(row.name, fontsize=10)
    fig.tight_layout()
    path = os.path.join(root, 'plots', 'curves', f'{row.name}.png')
    fig.savefig(path)
    paths.append(path)
  return paths

