"""Transfer learning: a run that starts from another run's weights (`config.transfer`), and the
parameter-path patterns that `transfer.init_exclude`, `optim.freeze` and `optim.lr_multipliers` use.

Paths. A variable's path is its keys within its collection joined by '/', as in the model's
variables: 'stage1_conv1/conv/kernel' (params), 'stage1_conv1/norm/mean' (batch_stats). A pattern is
an fnmatch pattern matched against a whole path ('*/norm/*', 'head*'), or a module's path, which
covers everything under it ('head', 'encoder/stage1_conv'): `matches`.

init_from. The run's state is initialised as usual, then every parameter and batch-norm statistic
whose path exists in the source with the same shape takes the source's value (its EMA parameters
when it kept some, as `cnnlab.load_run` does), except those `init_exclude` names. The source is a
run directory or converted weights (`cnnlab.pretrained.save_converted`); its checkpoint is
restored as plain arrays (no pickle, no model code). Every tensor of this run that keeps its fresh
initialisation, and every tensor of the source left unused, is said in one line on stderr and
recorded in WORKDIR/transfer.json. A resumed run continues from its own checkpoint: the loop
applies init_from only when a run starts.
"""

from __future__ import annotations

import fnmatch
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cnnlab import config as config_lib
from cnnlab import workdir as workdir_lib
from cnnlab.train.checkpoint import path_name

TRANSFER_FILE = 'transfer.json'  # WORKDIR/transfer.json: what init_from copied and what it did not
STEPS = ('latest', 'best')  # transfer.init_step besides a step number
COLLECTIONS = ('params', 'batch_stats')  # what is transferred


# ---- paths and patterns ----

def flat(tree) -> dict[str, Any]:
  """{path: leaf} of a pytree of variables (paths as `path_name` writes them)."""
  return {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def matches(pattern: str, path: str) -> bool:
  """Whether `pattern` matches `path` itself or a module above it ('head' matches 'head/kernel';
  'stage1_*' matches 'stage1_conv1/conv/kernel'; '*/norm/*' every batch norm's variables)."""
  parts = path.split('/')
  return any(fnmatch.fnmatchcase('/'.join(parts[:n]), pattern) for n in range(len(parts), 0, -1))


def matches_any(patterns: Iterable[str], path: str) -> bool:
  return any(matches(p, path) for p in patterns)


def unmatched_error(key: str, pattern: str, paths: Sequence[str], what: str) -> str:
  """The message for a pattern of config key `key` that matches none of `paths` (the `what` of
  the model: 'parameter', 'variable'), listing a few that exist."""
  import difflib
  close = difflib.get_close_matches(pattern, paths, n=3, cutoff=0.3)
  shown = list(dict.fromkeys([*close, *sorted(paths)]))[:6]
  return (f'{key}: pattern {pattern!r} matches no {what} of the model (paths are \'/\'-joined, '
          f'e.g. {", ".join(shown)}{" ..." if len(paths) > len(shown) else ""}; '
          f'{len(paths)} in all)')


def variable_shapes(model, image_shape: Sequence[int]) -> dict[str, dict[str, tuple[int, ...]]]:
  """{'params': {path: shape}, 'batch_stats': {path: shape}} of `model` on (H, W, C) images,
  abstractly (nothing is computed)."""
  def init():
    key = jax.random.key(0)
    return model.init({'params': key, 'dropout': key}, jnp.zeros((1, *image_shape), jnp.float32),
                      train=False)
  variables = jax.eval_shape(init)
  return {c: {p: tuple(x.shape) for p, x in flat(variables.get(c, {})).items()} for c in COLLECTIONS}


# ---- config ----

def parse_step(value) -> str | int:
  """transfer.init_step as 'latest', 'best' or a step number (an int or a string of digits);
  ValueError otherwise."""
  if isinstance(value, str) and value.strip().isdigit():
    return int(value)
  if value in STEPS or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
    return value
  raise ValueError(f'transfer.init_step={value!r}: expected \'latest\', \'best\' or a step number '
                   '(an int >= 0)')


def check_config(c) -> list[str]:
  """Problems with `config.transfer`'s values on their own (what needs the model is
  `check_patterns`'s, what needs the source is checked when the run starts)."""
  errors = []
  if c.init_from is not None and not c.init_from:
    errors.append("transfer.init_from='': expected a run directory, or None to train from scratch")
  try:
    parse_step(c.init_step)
  except ValueError as e:
    errors.append(str(e))
  if not all(isinstance(p, str) and p for p in c.init_exclude):
    errors.append(f'transfer.init_exclude={c.init_exclude!r}: expected a tuple of path patterns '
                  "(e.g. ('head',))")
  if c.init_from is None:
    for key, default in (('init_step', 'latest'), ('init_exclude', ())):
      if c[key] != default:
        errors.append(f'transfer.{key}={c[key]!r} has no effect without transfer.init_from')
  return errors


def check_patterns(c, shapes: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """A problem for each `transfer.init_exclude` pattern that matches none of the model's
  variables (`variable_shapes`)."""
  paths = sorted({*shapes['params'], *shapes['batch_stats']})
  return [unmatched_error('transfer.init_exclude', p, paths, 'parameter or batch statistic')
          for p in c.init_exclude if isinstance(p, str) and not any(matches(p, x) for x in paths)]


# ---- init_from ----

def _source_step(directory: str, init_step) -> tuple[int, str | None]:
  """(step, the source's model name or None) of `init_step` in the run directory `directory`;
  ConfigError naming the directory otherwise."""
  from cnnlab import tasks
  from cnnlab.train.checkpoint import Checkpointer
  key = f'transfer.init_from={directory!r}'
  if not os.path.isdir(directory):
    raise config_lib.ConfigError(f'{key}: no such directory')
  source_config = None
  path = workdir_lib.safe_join(directory, workdir_lib.CONFIG)
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      source_config = config_lib.from_json(f.read())
  metric, mode = tasks.headline(source_config) if source_config is not None else (None, 'max')
  ckpt = Checkpointer(directory, best_metric=metric, best_mode=mode, read_only=True)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise config_lib.ConfigError(
          f'{key} holds no committed checkpoint (looked in {ckpt.directory}); '
          'init_from takes a run directory or converted weights (cnnlab.pretrained.save_converted)')
    step = parse_step(init_step)
    if step == 'best':
      step = ckpt.best_step()
      if step is None:
        what = (f'carries an evaluation of {metric!r}' if metric else
                f'can be ranked ({directory} has no {workdir_lib.CONFIG} naming its best metric)')
        raise config_lib.ConfigError(
            f'transfer.init_step=\'best\': no checkpoint in {ckpt.directory} {what} (committed '
            f'steps: {steps}); use \'latest\' or a step number')
    elif step == 'latest':
      step = steps[-1]
    elif step not in steps:
      raise config_lib.ConfigError(
          f'transfer.init_step={init_step!r}: {directory} has no checkpoint at step {step} '
          f'(committed steps: {steps})')
  finally:
    ckpt.close()
  name = source_config.model.name if source_config is not None and 'model' in source_config else None
  return step, name


def _restore(directory: str, step: int) -> tuple[dict, bool]:
  """The source's {'params', 'batch_stats'} at `step` as plain arrays, with its EMA parameters
  in place of its parameters when it has them; and whether it had them."""
  from cnnlab.train.checkpoint import Checkpointer
  ckpt = Checkpointer(directory, read_only=True)
  try:
    restored = ckpt.restore_arrays(step)
  finally:
    ckpt.close()
  ema = restored.get('ema_params')
  variables = {'params': ema or restored['params'], 'batch_stats': restored.get('batch_stats') or {}}
  return variables, bool(ema)


def initialize(state, c, model_name: str):
  """`state` (a fresh TrainState of the model `model_name`) with the tensors of the run
  `c.init_from` (a `config.transfer` section) copied in; and the report of what was copied
  ({'copied', 'reinitialised', 'unused', ...}, written to transfer.json).

  ConfigError, before anything is trained, for a directory without a checkpoint, a step it does not
  have, or a source that gives nothing (no path with the same shape), naming both models.
  """
  directory = c.init_from
  step, source_name = _source_step(directory, c.init_step)
  source, used_ema = _restore(directory, step)
  source_label = repr(source_name) if source_name else f'the model in {directory}'
  target = {col: flat(getattr(state, col) or {}) for col in COLLECTIONS}
  given = {col: flat(source[col]) for col in COLLECTIONS}
  copied: dict[str, dict[str, Any]] = {col: {} for col in COLLECTIONS}
  excluded, absent, reshaped, unused = [], [], {}, []
  for col in COLLECTIONS:
    for path, x in target[col].items():
      name = f'{col}/{path}'
      if matches_any(c.init_exclude, path):
        excluded.append(name)
      elif path not in given[col]:
        absent.append(name)
      elif tuple(np.shape(given[col][path])) != tuple(x.shape):
        reshaped[name] = {'shape': list(x.shape), 'source_shape': list(np.shape(given[col][path]))}
      else:
        copied[col][path] = jax.device_put(jnp.asarray(given[col][path], x.dtype), x.sharding)
    unused += [f'{col}/{p}' for p in given[col] if p not in copied[col]]
  names = [f'{col}/{p}' for col in COLLECTIONS for p in copied[col]]
  if not names:
    def some(paths):
      shown = sorted(paths)[:6]
      return ', '.join(shown) + (' ...' if len(paths) > len(shown) else '')
    raise config_lib.ConfigError(
        f'transfer.init_from={directory!r}: nothing to transfer: no parameter or batch statistic of '
        f'{model_name!r} (this run) has the path and shape of one of {source_label} (step {step})'
        + (f' outside transfer.init_exclude={tuple(c.init_exclude)!r}' if c.init_exclude else '')
        + f'. {model_name!r} has {some(target["params"])}; {source_label} has '
        f'{some(given["params"])}')

  def replace(col, tree):
    if not tree:
      return tree
    return jax.tree_util.tree_map_with_path(
        lambda p, x: copied[col].get(path_name(p), x), tree)
  params = replace('params', state.params)
  state = state.replace(
      params=params, batch_stats=replace('batch_stats', state.batch_stats),
      ema_params=None if state.ema_params is None else jax.tree.map(jnp.copy, params))
  report = {
      'init_from': os.path.abspath(directory), 'step': step, 'source_model': source_name,
      'model': model_name, 'source_ema': used_ema,
      'copied': names,
      'num_copied_values': int(sum(math.prod(x.shape) for col in COLLECTIONS
                                   for x in copied[col].values())),
      'reinitialised': {'excluded': excluded, 'not_in_source': absent, 'shape_changed': reshaped},
      'unused': sorted(unused),
  }
  return state, report


def _compact(names: Sequence[str], universe: Iterable[str]) -> list[str]:
  """`names` (collection-prefixed paths) for one line: collections dropped, and a top-level
  module all of whose tensors in `universe` are listed written once as 'decoder/* (12)'."""
  strip = lambda n: n.split('/', 1)[1]  # noqa: E731
  paths = [strip(n) for n in names]
  whole: dict[str, int] = {}
  for p in universe:
    top = strip(p).split('/', 1)[0]
    whole[top] = whole.get(top, 0) + 1
  out, done = [], set()
  for p in paths:
    top = p.split('/', 1)[0]
    if top in done:
      continue
    count = sum(1 for q in paths if q.split('/', 1)[0] == top)
    if count == whole.get(top) and count > 1:
      out.append(f'{top}/* ({count})')
      done.add(top)
    else:
      out.append(p)
  return out


def summary_line(report: dict, limit: int = 12) -> str:
  """The one stderr line of a transfer: what was copied, what keeps its fresh initialisation and
  why, what of the source went unused."""
  def listing(items):
    shown = ', '.join(items[:limit])
    return shown + (f', ... {len(items) - limit} more (transfer.json)' if len(items) > limit else '')
  reinit = report['reinitialised']
  target = [*report['copied'], *reinit['excluded'], *reinit['not_in_source'], *reinit['shape_changed']]
  source = [*report['copied'], *report['unused']]
  fresh = [f'{p} (init_exclude)' for p in _compact(reinit['excluded'], target)]
  fresh += [f'{p} (not in the source)' for p in _compact(reinit['not_in_source'], target)]
  fresh += [f'{n.split("/", 1)[1]} {tuple(s["shape"])} (source {tuple(s["source_shape"])})'
            for n, s in reinit['shape_changed'].items()]
  unused = _compact(report['unused'], source)
  source_name = report['source_model'] or 'source'
  ema = ', EMA parameters' if report['source_ema'] else ''
  fresh_count = len(target) - len(report['copied'])
  return (f"cnnlab: transfer.init_from {report['init_from']} ({source_name} step {report['step']}"
          f"{ema}) -> {report['model']}: copied {len(report['copied'])} tensors "
          f"({report['num_copied_values']:,} values); re-initialised {fresh_count}"
          f"{': ' + listing(fresh) if fresh else ''}; unused from the source {len(report['unused'])}"
          f"{': ' + listing(unused) if unused else ''}")


__all__ = ['TRANSFER_FILE', 'path_name', 'flat', 'matches', 'matches_any', 'variable_shapes',
           'parse_step', 'check_config', 'check_patterns', 'initialize', 'summary_line']
