"""Experiment configs: load a config file, apply `--config.a.b=value` overrides, validate.

A config file defines `get_config()` returning an ml_collections.ConfigDict built on
`cnnlab.configs.base`. A loaded config has exactly the base config's keys (plus the model's
arguments under `model`, which the model checks): a key the file added or misspelt fails with a
suggestion, as does an override of a key that does not exist or with a value of another type.
`validate` collects every other problem before anything compiles or any directory is written.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import sys
from typing import Any, Sequence

import ml_collections

OPTIMIZERS = ('sgd', 'adam', 'adamw', 'lamb')
SCHEDULES = ('constant', 'cosine', 'piecewise', 'onecycle', 'triangular')
STRATEGIES = ('jit', 'pmap')


class ConfigError(ValueError):
  """A configuration problem; the message names the key(s) and value(s)."""


def load_module(path: str):
  """Imports a config file by path (its directory goes on sys.path, so it can import the files
  beside it). A missing file, a syntax error or an exception while importing it is a ConfigError
  naming the file and line."""
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path!r} does not exist')
  directory = os.path.dirname(os.path.abspath(path))
  if directory not in sys.path:
    sys.path.insert(0, directory)
  name = f'_cnnlab_config_{abs(hash(os.path.abspath(path)))}'
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f'{e.filename}:{e.lineno}: syntax error in the config file: {e.msg}') from None
  except Exception as e:  # noqa: BLE001 - the user's file: say where it failed, not our stack
    raise ConfigError(f'{_where(e, path)}: importing the config file failed: '
                      f'{type(e).__name__}: {e}') from None
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'config file {path!r} defines no get_config()')
  return module


def _where(error: BaseException, path: str) -> str:
  """'file:line' of the innermost frame of `error` in the config file `path` (else the file)."""
  import traceback
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if os.path.abspath(f.filename) == os.path.abspath(path)]
  return f'{path}:{frames[-1].lineno}' if frames else path


def load(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`get_config()` of the file at `path`, checked against the base config, locked, with
  `key=value` overrides applied."""
  module = load_module(path)
  try:
    config = module.get_config()
  except Exception as e:  # noqa: BLE001
    raise ConfigError(f'{_where(e, path)}: get_config() failed: {type(e).__name__}: {e}') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'get_config() of {path!r} must return an ml_collections.ConfigDict, got '
                      f'{type(config).__name__}')
  check_keys(config, path)
  config.lock()
  for item in overrides:
    key, sep, value = item.partition('=')
    if not sep:
      raise ConfigError(f'override {item!r} must look like key=value (e.g. train.batch_size=64)')
    set_value(config, key.strip(), parse_value(value))
  check_model_keys(config)
  return config


def check_model_keys(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for a key under `model` that is not an argument of the model (with a
  suggestion), once the model's module is imported; an unknown model is `validate`'s to report."""
  from cnnlab import models
  try:
    models.import_modules(config.model.imports)
    fields = models.get_spec(config.model.name).fields
  except ValueError:
    return
  # (num_classes is cnnlab's own key: unset, it is no argument a model without classes lacks)
  unknown = [k for k in config.model if k not in ('name', 'imports') and k not in fields
             and not (k == 'num_classes' and config.model.num_classes is None)]
  if unknown:
    close = difflib.get_close_matches(unknown[0], sorted(fields), n=1, cutoff=0.6)
    hint = f" Did you mean 'model.{close[0]}'?" if close else ''
    raise ConfigError(f"unknown config key 'model.{unknown[0]}': model {config.model.name!r} has "
                      f"no argument {unknown[0]!r}.{hint} Its arguments: {', '.join(sorted(fields))}")


def check_keys(config: ml_collections.ConfigDict, source: str) -> None:
  """Raises ConfigError if `config` (from `source`) has a key the base config does not (a
  misspelt one gets a suggestion) or lacks one it has. `model.*` keys are the model's business:
  `validate` checks them against its arguments."""
  from cnnlab.configs import base
  reference = base.get_config()
  known, have = set(flat_keys(reference)), set(flat_keys(config))
  in_model = lambda key: key.startswith('model.')  # noqa: E731
  unknown = sorted(k for k in have - known if not in_model(k))
  missing = sorted(k for k in known - have if not in_model(k) or k in ('model.name', 'model.imports'))
  problems = []
  for key in unknown:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ''
    problems.append(f'unknown config key {key!r}.{hint}')
  if missing:
    problems.append(f'keys of the base config missing: {", ".join(missing[:5])}'
                    f'{" ..." if len(missing) > 5 else ""} (build the config on '
                    'cnnlab.configs.base.get_config())')
  if problems:
    raise ConfigError(f'{source}: ' + '; '.join(problems))


def parse_value(text: str) -> Any:
  """A Python literal if `text` is one ('5', '0.1', 'True', '(3, 5)', 'None'), else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def flat_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  keys = []
  for key, value in config.items():
    keys.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(flat_keys(value, f'{prefix}{key}.'))
  return keys


def unknown_key_error(config: ml_collections.ConfigDict, key: str) -> ConfigError:
  close = difflib.get_close_matches(key, flat_keys(config), n=3, cutoff=0.6)
  hint = f' Did you mean {", ".join(map(repr, close))}?' if close else ''
  return ConfigError(f'unknown config key {key!r}.{hint}')


def get_value(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise unknown_key_error(config, key)
    node = node[part]
  return node


def set_value(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """config[key] = value for a dotted key that must exist; the value must keep the key's type."""
  *parents, leaf = key.split('.')
  node = config
  for part in parents:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise unknown_key_error(config, key)
    node = node[part]
  if parents == ['model'] and isinstance(node, ml_collections.ConfigDict) and leaf not in node:
    # Any argument of the model may be set, listed in the experiment or not: the model checks
    # the names when the config is validated (a misspelt one fails there, with a suggestion).
    with node.unlocked():
      node[leaf] = tuple(value) if isinstance(value, list) else value
    return
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise unknown_key_error(config, key)
  if isinstance(node[leaf], ml_collections.ConfigDict):
    raise ConfigError(f'{key!r} is a section, not a value; set one of its keys '
                      f'({", ".join(sorted(node[leaf].keys()))})')
  old = node[leaf]
  if isinstance(value, list):
    value = tuple(value)
  if parents == ['model'] and leaf not in ('name', 'imports') and old is not None:
    # A model argument is typed by the model, which checks it when it is built: one value for
    # every stage (3) or one per stage ((3, 5, 7)) are both valid for conv_stack.
    with node.unlocked():
      del node[leaf]
      node[leaf] = value
    return
  if isinstance(old, tuple) and isinstance(value, (int, float, str)):
    value = (value,)
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  try:
    with node.unlocked():
      node[leaf] = value
  except TypeError as e:
    raise ConfigError(f'{key}={value!r}: expected {type(old).__name__}, like the default '
                      f'{old!r} ({e})') from None


def flatten(tree, prefix: str = '') -> dict[str, Any]:
  """{'train': {'batch_size': 128}} -> {'train.batch_size': 128} (dicts or ConfigDicts)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def from_json(text: str) -> ml_collections.ConfigDict:
  """A config stored by `to_json` (tuples come back as tuples)."""
  def tuples(v):
    if isinstance(v, dict):
      return {k: tuples(x) for k, x in v.items()}
    return tuple(tuples(x) for x in v) if isinstance(v, list) else v
  return ml_collections.ConfigDict(tuples(json.loads(text)))


def validate(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Checks the whole config before anything compiles or any directory is written.

  Raises ConfigError listing every problem (each naming its key). Returns facts derived on the
  way ({'info': DatasetInfo, 'num_classes': int, 'num_devices': int}) so callers need not
  recompute them. (The keys that name the model's parameters, optim.freeze,
  optim.lr_multipliers and the transfer section, are the training set-up's to check.)
  """
  import jax
  from cnnlab import data, models, tasks
  errors: list[str] = []

  def check(ok: bool, message: str) -> None:
    if not ok:
      errors.append(message)

  def choice(key: str, options) -> None:
    value = get_value(config, key)
    check(value in options, f'{key}={value!r}: expected one of {tuple(options)}')

  check(isinstance(config.seed, int) and config.seed >= 0, f'seed={config.seed!r}: expected an int >= 0')
  choice('dtype', tuple(models.DTYPES))
  choice('optim.name', OPTIMIZERS)
  choice('optim.schedule', SCHEDULES)
  choice('parallel.strategy', STRATEGIES)
  choice('train.on_nonfinite', ('halt', 'skip'))
  if config.checkpoint.best_mode is not None:
    choice('checkpoint.best_mode', ('max', 'min'))
  choice('log.progress', ('auto', 'bar', 'plain', 'none'))
  check(config.log.tensorboard or not config.log.images,
        'log.images=True draws into TensorBoard: it needs log.tensorboard=True')
  for key in ('train.batch_size', 'train.log_every_steps', 'checkpoint.keep',
              'train.max_consecutive_skips'):
    check(get_value(config, key) >= 1, f'{key}={get_value(config, key)!r}: expected a positive int')
  for key in ('train.num_steps', 'train.eval_every_steps', 'train.eval_batch_size',
              'checkpoint.every_steps', 'optim.weight_decay', 'optim.clip_norm',
              'optim.warmup_epochs', 'train.label_smoothing', 'train.aux_loss_weight'):
    check(get_value(config, key) >= 0, f'{key}={get_value(config, key)!r}: expected >= 0')
  check(config.train.num_steps > 0 or config.train.num_epochs > 0,
        f'train.num_epochs={config.train.num_epochs!r} and train.num_steps=0: nothing to train')
  check(config.optim.learning_rate > 0, f'optim.learning_rate={config.optim.learning_rate!r}: expected > 0')
  for key in ('optim.momentum', 'optim.ema_decay', 'train.label_smoothing'):
    check(0 <= get_value(config, key) < 1, f'{key}={get_value(config, key)!r}: expected in [0, 1)')
  check(all(0 < b < 1 for b in config.optim.boundaries) and list(config.optim.boundaries) ==
        sorted(config.optim.boundaries),
        f'optim.boundaries={config.optim.boundaries!r}: expected increasing fractions in (0, 1)')
  check(0 < config.optim.peak_fraction < 1,
        f'optim.peak_fraction={config.optim.peak_fraction!r}: expected in (0, 1)')
  check(not (config.parallel.fsdp and config.parallel.strategy == 'pmap'),
        'parallel.fsdp=True needs parallel.strategy=\'jit\'')

  available = jax.device_count()
  num_devices = config.parallel.num_devices or available
  check(0 <= config.parallel.num_devices <= available,
        f'parallel.num_devices={config.parallel.num_devices}: only {available} devices exist')
  for key in ('train.batch_size', 'train.eval_batch_size'):
    value = get_value(config, key)
    check(value == 0 or value % num_devices == 0,
          f'{key}={value} is not divisible by the {num_devices} devices')

  info, num_classes = None, config.model.num_classes
  task = None
  if config.task.name not in tasks.TASK_NAMES:
    errors.append(f'task.name={config.task.name!r}: expected one of {tasks.TASK_NAMES}')
  else:
    task = tasks.get(config.task.name)
    best = tasks.headline(config)[0]
    check(best == '' or best in task.metrics,
          f'checkpoint.best_metric={best!r}: the {task.name} task\'s evaluation gives '
          f'{", ".join(task.metrics)} (or \'\' for no best checkpoint)')
  try:
    data.augment._check(config.data.augment)
  except ValueError as e:
    errors.append(str(e))
  if config.data.name not in data.list_datasets():
    errors.append(f'data.name={config.data.name!r}: unknown dataset; available: '
                  f'{", ".join(data.list_datasets())}')
  else:
    try:
      info = data.info(config.data.name, data_dir=config.data.data_dir,
                       image_size=config.data.image_size, **data.builder_kwargs(config.data))
    except ValueError as e:
      errors.append(f'data.name={config.data.name!r}: {e}')
  if info is not None:
    for key in ('train_split', 'eval_split'):
      split = config.data[key]
      check(split in info.splits, f'data.{key}={split!r}: {info.name} has splits {sorted(info.splits)}')
    if config.data.train_split in info.splits:
      size = info.splits[config.data.train_split]
      per_class = config.data.examples_per_class
      check(per_class >= 0, f'data.examples_per_class={per_class!r}: expected >= 0')
      if per_class > 0:  # at most; a class with fewer examples gives fewer
        size = min(size, per_class * info.num_classes)
      check(config.train.batch_size <= size,
            f'train.batch_size={config.train.batch_size} is larger than the {size} examples of '
            f'{info.name}/{config.data.train_split}' +
            (f' (data.examples_per_class={per_class})' if per_class > 0 else ''))
  if info is not None and task is not None:
    problems = tasks.check_config(config, info)
    errors.extend(problems)
    if not problems:
      expected = task.model_classes(info)
      if num_classes is None:
        num_classes = expected
      background = ' (its classes and the background)' if task.name == 'segmentation' else ''
      check(num_classes == expected,
            f'model.num_classes={config.model.num_classes} does not fit {task.name} on '
            f'{info.name}, which needs {expected}{background}')
  try:
    models.import_modules(config.model.imports)
    models.from_config(config, num_classes)
  except ValueError as e:
    errors.append(f'model: {e}')
  if errors:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(errors))
  return {'info': info, 'num_classes': num_classes, 'num_devices': num_devices}
