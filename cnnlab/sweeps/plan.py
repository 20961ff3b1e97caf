"""Ablation sweeps: a config file's `get_sweep()` -> one run directory per point -> `cnnlab train`.

A config file that defines `get_sweep()` returns the override dicts to run, built with `grid`,
`zipped`, `product` and `with_seeds`:

    def get_sweep():
      return sweep.with_seeds(sweep.grid({'model.kernel_size': [3, 5, 7],
                                          'model.pool': ['max', 'avg']}), 3)

`plan()` checks every point before anything runs (each key must exist in the config, a misspelt
one fails with a suggestion; no two points may be the same run) and gives each a readable,
deterministic directory under the root, `kernel_size=5,pool=max,seed=1`, derived from the point
alone. A run directory whose stored config.json is not the config its point resolves to is
refused, never reused. `cnnlab.sweeps.runner.run` executes the points; `cnnlab.sweeps.report`
turns the root into a table and plots.

This module does not import JAX, so that `cnnlab sweep` starts fast and leaves devices to its runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

from cnnlab import config as config_lib, workdir

SEED_KEY = 'seed'
# Keys that do not change what a run computes: they may differ between a stored run and the point.
IGNORED_KEYS = ('log', 'compilation_cache_dir', 'parallel.cpu_devices', 'data.data_dir')
RECORD_FILE = 'sweep.json'  # written into the root: the command, the points, each launch
_NAME_LIMIT = 120


# ---- definitions ----

def grid(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
  """Every combination of the axes' values, the last key varying fastest.

  grid({'model.kernel_size': [3, 5], 'model.pool': ['max', 'avg']}) -> 4 points.
  """
  keys = list(axes)
  for key in keys:
    _check_values(key, axes[key])
  return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def zipped(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
  """The axes' values taken together: point i holds value i of every key (equal lengths)."""
  lengths = {key: len(_check_values(key, values)) for key, values in axes.items()}
  if len(set(lengths.values())) > 1:
    raise config_lib.ConfigError(f'zipped() needs axes of equal length, got {lengths}')
  return [dict(zip(axes, values)) for values in zip(*axes.values())]


def product(*sweeps: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Every combination of one point from each sweep, merged (the sweeps' keys must differ)."""
  points = [{}]
  for sweep in sweeps:
    merged = []
    for a, b in itertools.product(points, sweep):
      shared = set(a) & set(b)
      if shared:
        raise config_lib.ConfigError(f'product() of sweeps that both set {sorted(shared)}')
      merged.append({**a, **b})
    points = merged
  return points


def with_seeds(sweep: Sequence[Mapping[str, Any]], seeds: int | Iterable[int],
               key: str = SEED_KEY) -> list[dict[str, Any]]:
  """Each point once per seed (`seeds`: a count, 0..n-1, or the seeds themselves), seed last."""
  seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
  _check_values(key, seeds)
  return [{**point, key: seed} for point in sweep for seed in seeds]


def transfer_ways(source: str, backbone: Sequence[str], *, learning_rate: float,
                  head_learning_rate: float, slow: float = 0.1,
                  exclude: Sequence[str] = ('head',)) -> list[dict[str, Any]]:
  """The four ways to use a trained run's network on a new task, as sweep points:

    scratch   no transfer, everything trained at `learning_rate`
    probe     `source`'s weights, the `backbone` patterns frozen (weights and batch-norm
              statistics) under a fresh head (`exclude`) trained at `head_learning_rate`
    finetune  `source`'s weights, everything trained at `learning_rate`
    slow      `source`'s weights, the head at `head_learning_rate` and the backbone at `slow`
              times that (optim.lr_multipliers)

  `source` is a run directory (relative to where the sweep runs); `backbone` the path patterns of
  everything but the head (optim.freeze's syntax)."""
  backbone = tuple(backbone)
  transfer = {'transfer.init_from': source, 'transfer.init_exclude': tuple(exclude)}
  lr, head_lr = ({'optim.learning_rate': learning_rate},
                 {'optim.learning_rate': head_learning_rate})
  return [
      {'transfer.init_from': None, 'transfer.init_exclude': (), 'optim.freeze': (),
       'optim.lr_multipliers': (), **lr},
      {**transfer, 'optim.freeze': backbone, 'optim.lr_multipliers': (), **head_lr},
      {**transfer, 'optim.freeze': (), 'optim.lr_multipliers': (), **lr},
      {**transfer, 'optim.freeze': (),
       'optim.lr_multipliers': tuple((pattern, slow) for pattern in backbone), **head_lr},
  ]


def _check_values(key: str, values) -> Sequence[Any]:
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
    raise config_lib.ConfigError(f'sweep axis {key!r} needs a non-empty list of values, '
                                 f'got {values!r}')
  return values


# ---- planning ----

@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep."""
  index: int
  overrides: dict[str, Any]  # the point's own settings, as get_sweep() gave them
  name: str  # directory name under the root
  directory: str
  config_file: str  # absolute path of the experiment file
  args: tuple[str, ...]  # every `key=value` override of the run: the common ones, then the point's
  config: dict[str, Any]  # the resolved config (JSON types): what config.json must hold

  def command(self, python: str | None = None) -> list[str]:
    """The `cnnlab train` command line of this run."""
    head = [python, '-m', 'cnnlab.cli'] if python else ['cnnlab']
    return [*head, 'train', '--config', self.config_file, '--workdir', self.directory,
            *(f'--config.{a}' for a in self.args)]


def run_name(overrides: Mapping[str, Any]) -> str:
  """The directory name of a point: `kernel_size=5,stride=2,pool=max,seed=1`.

  Each key is shown by its last component (the full dotted key where two would clash), in the
  point's order. Characters outside [A-Za-z0-9._+=,-] become '_'; a name that lost information
  that way, or is too long, ends with a hash of the point, so distinct points keep distinct names.
  A name depends on its point only, never on the rest of the sweep.
  """
  if not overrides:
    return 'default'
  leaves = [key.rsplit('.', 1)[-1] for key in overrides]
  raw = ','.join(f'{leaf if leaves.count(leaf) == 1 else key}={_format(value)}'
                 for (key, value), leaf in zip(overrides.items(), leaves))
  name = re.sub(r'[^A-Za-z0-9._+=,-]', '_', raw)
  if name != raw or len(name) > _NAME_LIMIT:
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=repr).encode()).hexdigest()
    name = f'{name[:_NAME_LIMIT - 9]},{digest[:8]}'
  return name


def _format(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    return '-'.join(map(_format, value)) if value else 'empty'
  return repr(value) if isinstance(value, float) else str(value)


def literal(key: str, value: Any) -> str:
  """`value` as the command line writes it, so that config.parse_value reads it back unchanged."""
  if isinstance(value, float) and value in (float('inf'), float('-inf')):
    text = '1e999' if value > 0 else '-1e999'  # what ast.literal_eval reads as infinity
  else:
    text = repr(value)
  if config_lib.parse_value(text) != value:
    raise config_lib.ConfigError(f'sweep value {key}={value!r} cannot be passed on a command line')
  return text


def load_sweep(config_file: str) -> list[dict[str, Any]]:
  """The points `get_sweep()` of `config_file` returns, checked for shape."""
  module = config_lib.load_module(config_file)
  if not hasattr(module, 'get_sweep'):
    raise config_lib.ConfigError(f'config file {config_file!r} defines no get_sweep() '
                                 '(a single run is `cnnlab train`)')
  points = module.get_sweep()
  if not isinstance(points, (list, tuple)) or not points:
    raise config_lib.ConfigError(f'get_sweep() of {config_file!r} must return a non-empty list '
                                 f'of override dicts, got {type(points).__name__}')
  for i, point in enumerate(points):
    if not isinstance(point, Mapping) or not all(isinstance(k, str) for k in point):
      raise config_lib.ConfigError(f'get_sweep() point {i} must be a dict of dotted config keys, '
                                   f'got {point!r}')
  return [dict(p) for p in points]


def plan(config_file: str, root: str, overrides: Sequence[str] = (),
         points: Sequence[Mapping[str, Any]] | None = None) -> list[Point]:
  """Every point of the sweep, checked before anything runs.

  overrides: `key=value` strings applied to every point (they may not set a swept key).
  points: the override dicts (default: the file's get_sweep()).
  Raises ConfigError naming the problem: an unknown key (with a suggestion) or a wrong type, two
  points that resolve to the same run, or a name that would leave the root.
  """
  config_file = os.path.abspath(config_file)
  points = load_sweep(config_file) if points is None else [dict(p) for p in points]
  common = [item.strip() for item in overrides]
  common_keys = {item.partition('=')[0].strip() for item in common}
  config_lib.load(config_file, common)  # the common overrides alone: their errors are theirs
  root_real = os.path.realpath(root)
  planned, seen, names = [], {}, {}
  for index, point in enumerate(points):
    clash = sorted(common_keys & set(point))
    if clash:
      raise config_lib.ConfigError(f'--config.{clash[0]} is swept by get_sweep(); it cannot '
                                   'also be set for every point')
    args = (*common, *(f'{k}={literal(k, v)}' for k, v in point.items()))
    try:
      config = config_lib.load(config_file, args)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f'sweep point {index} {point}: {e}') from None
    resolved = json.loads(config_lib.to_json(config))
    key = json.dumps(fingerprint(resolved), sort_keys=True)
    if key in seen:
      raise config_lib.ConfigError(f'sweep points {seen[key]} and {index} are the same run: '
                                   f'{points[seen[key]]} and {point}')
    seen[key] = index
    name = run_name(point)
    if name in names:
      raise config_lib.ConfigError(f'sweep points {names[name]} and {index} would share the '
                                   f'directory {name!r}')
    names[name] = index
    directory = os.path.join(root, name)
    if os.path.dirname(os.path.realpath(directory)) != root_real:
      raise config_lib.ConfigError(f'run name {name!r} leaves the root {root!r}')
    planned.append(Point(index, point, name, directory, config_file, args, resolved))
  return planned


def describe(points: Sequence[Point], config_file: str, root: str,
             overrides: Sequence[str] = ()) -> str:
  """The dry run: each point's index, state, directory and overrides."""
  states = [state(p) for p in points]
  counts = ', '.join(f'{states.count(s)} {s}' for s in dict.fromkeys(states))
  common = ''.join(f' --config.{o}' for o in overrides)
  width = max(len(p.name) for p in points)
  return '\n'.join([
      f'{len(points)} points under {root} ({counts}); each runs',
      f'  cnnlab train --config {config_file} --workdir {os.path.join(root, "NAME")}{common} '
      '--config.KEY=VALUE ...',
      *(f'{p.index:4d}  {s:9s} {p.name:{width}s}  {" ".join(p.args[len(overrides):])}'
        for p, s in zip(points, states))])


def select(points: Sequence[Point], indices: str) -> list[Point]:
  """The points named by `indices`: '3', '0,5,7' or '2-4' (as SLURM array ids are written)."""
  chosen = []
  for part in indices.split(','):
    lo, _, hi = part.strip().partition('-')
    try:
      chosen.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
      raise config_lib.ConfigError(f'--index {indices!r}: expected 3, 0,5,7 or 2-4') from None
  bad = [i for i in chosen if not 0 <= i < len(points)]
  if bad:
    raise config_lib.ConfigError(f'--index {bad[0]}: the sweep has points 0..{len(points) - 1}')
  return [points[i] for i in dict.fromkeys(chosen)]


# ---- the state of a run directory ----

def fingerprint(config: Mapping[str, Any],
                ignored: Sequence[str] = IGNORED_KEYS) -> dict[str, Any]:
  """The flattened config minus the `ignored` keys and sections (IGNORED_KEYS: what makes two
  runs the same run)."""
  return {k: v for k, v in config_lib.flatten(config).items()
          if not any(k == i or k.startswith(i + '.') for i in ignored)}


def mismatch(point: Point) -> str | None:
  """Why the point's directory cannot hold this point (its config.json is another config), or None."""
  stored = workdir.read_json(os.path.join(point.directory, workdir.CONFIG))
  if stored is None:
    return None  # nothing was trained there yet (or config.json is unreadable: nothing to reuse)
  have, want = fingerprint(stored), fingerprint(point.config)
  diff = sorted(k for k in have.keys() | want.keys() if have.get(k, '?') != want.get(k, '?'))
  if not diff:
    return None
  shown = ', '.join(f'{k}: stored {have.get(k, "(absent)")!r}, expected {want.get(k, "(absent)")!r}'
                    for k in diff[:3])
  more = f' and {len(diff) - 3} more' if len(diff) > 3 else ''
  return (f'{point.directory} holds a run of another config ({shown}{more}); '
          'move it away or use another --root')


def state(point: Point) -> str:
  """'mismatch', 'finished', 'failed' (last attempt), 'partial' (started), or 'new'."""
  join = lambda f: os.path.join(point.directory, f)  # noqa: E731
  if mismatch(point):
    return 'mismatch'
  if workdir.is_finished(point.directory):
    return 'finished'
  if os.path.exists(join(workdir.ERROR)):
    return 'failed'
  return 'partial' if os.path.exists(join(workdir.CONFIG)) else 'new'
