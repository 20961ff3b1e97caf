"""Optimizer and learning-rate schedule from `config.optim`, built from optax.

`optim.freeze` and `optim.lr_multipliers` select parameters by path pattern
(`cnnlab.train.transfer.matches`: 'encoder', 'stage1_*', '*/norm/*'). Frozen parameters are a
partition of their own (`optax.partition`, the former `multi_transform`) whose update is
`optax.set_to_zero()`: they get no update, no weight decay, no optimizer state, and take no part
in gradient clipping (as parameters without gradients in PyTorch). A multiplier scales the final
update of its parameters (`optax.masked(optax.scale(factor))` after the whole optimizer), which is
their learning rate times the factor, weight decay included, as a PyTorch parameter group's `lr`.
Without either key the optimizer is exactly the plain one.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cnnlab.train import transfer


def schedule(c: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """Learning rate per step (float32). Warmup (linear from 0) is part of constant/cosine/piecewise."""
  inner = _schedule(c, total_steps, steps_per_epoch)

  def learning_rate(count):
    # optax's piecewise schedules mix bool and float arrays (see standard_promotion).
    with jax.numpy_dtype_promotion('standard'):
      return jnp.asarray(inner(count), jnp.float32)
  return learning_rate


def _schedule(c: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  lr = c.learning_rate
  total_steps = max(total_steps, 1)
  warmup = min(int(round(c.warmup_epochs * steps_per_epoch)), total_steps - 1) if c.warmup_epochs else 0
  rest = total_steps - warmup
  if c.schedule == 'constant':
    main = optax.constant_schedule(lr)
  elif c.schedule == 'cosine':
    main = optax.cosine_decay_schedule(lr, rest, alpha=c.end_lr_fraction)
  elif c.schedule == 'piecewise':
    main = optax.piecewise_constant_schedule(
        lr, {int(b * total_steps) - warmup: c.decay_factor for b in c.boundaries})
  elif c.schedule == 'onecycle':
    return optax.cosine_onecycle_schedule(total_steps, lr, pct_start=c.peak_fraction)
  elif c.schedule == 'triangular':
    peak = max(int(c.peak_fraction * total_steps), 1)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, peak),
                                 optax.linear_schedule(lr, 0.0, total_steps - peak)], [peak])
  else:
    raise ValueError(f'optim.schedule: unknown {c.schedule!r}')
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(params):
  """True for kernels (rank >= 2); norm scales and biases get no weight decay."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def optimizer(c: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
  """The configured optimizer, with clipping and masked weight decay; frozen parameters and
  learning-rate multipliers as the module docstring says. The partitions are functions of the
  parameters' paths, so the optimizer applies to any tree of the model's parameters."""
  parts = []
  if c.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(c.clip_norm))
  if c.name in ('sgd', 'adam') and c.weight_decay > 0:  # coupled L2, as PyTorch's weight_decay
    parts.append(optax.add_decayed_weights(c.weight_decay, mask=decay_mask))
  if c.name == 'sgd':
    parts.append(optax.sgd(lr, momentum=c.momentum or None, nesterov=c.nesterov))
  elif c.name == 'adam':
    parts.append(optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps))
  elif c.name == 'adamw':
    parts.append(optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                             mask=decay_mask))
  elif c.name == 'lamb':
    parts.append(optax.lamb(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                            mask=decay_mask))
  else:
    raise ValueError(f'optim.name: unknown optimizer {c.name!r}')
  tx = optax.chain(*parts)
  multipliers = lr_multipliers(c.lr_multipliers)
  if multipliers:
    # The first pattern that matches a parameter gives its factor (a parameter is scaled once).
    def group(i):
      def mask(tree):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: _first_match(multipliers, transfer.path_name(p)) == i, tree)
      return mask
    tx = optax.chain(tx, *(optax.masked(optax.scale(factor), group(i))
                           for i, (_, factor) in enumerate(multipliers)))
  if c.freeze:
    freeze = tuple(c.freeze)

    def labels(tree):
      return jax.tree_util.tree_map_with_path(
          lambda p, _: 'frozen' if transfer.matches_any(freeze, transfer.path_name(p)) else 'trained',
          tree)
    tx = optax.partition({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
  return standard_promotion(tx)


def lr_multipliers(value) -> tuple[tuple[str, float], ...]:
  """`optim.lr_multipliers` as (pattern, factor) pairs: a tuple of pairs, or one pair on its own
  (`--config.optim.lr_multipliers="('encoder', 0.1)"`). ValueError naming the key otherwise."""
  if isinstance(value, Mapping):
    value = tuple(value.items())
  value = tuple(value)
  if len(value) == 2 and isinstance(value[0], str) and not isinstance(value[1], (tuple, list)):
    value = (value,)
  pairs = []
  for item in value:
    ok = (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
          and item[0] and isinstance(item[1], (int, float)) and not isinstance(item[1], bool))
    if not ok or not item[1] > 0:
      raise ValueError(f'optim.lr_multipliers={value!r}: expected (pattern, factor > 0) pairs, e.g. '
                       "(('encoder', 0.1),); a factor of 0 is optim.freeze")
    pairs.append((item[0], float(item[1])))
  return tuple(pairs)


def _first_match(multipliers: Sequence[tuple[str, float]], path: str) -> int | None:
  return next((i for i, (pattern, _) in enumerate(multipliers) if transfer.matches(pattern, path)),
              None)


def check_config(c: ml_collections.ConfigDict) -> list[str]:
  """Problems with `optim.freeze` and `optim.lr_multipliers` on their own (what needs the model
  is `check_patterns`'s)."""
  errors = []
  if not all(isinstance(p, str) and p for p in c.freeze):
    errors.append(f"optim.freeze={c.freeze!r}: expected a tuple of path patterns (e.g. ('encoder',))")
  try:
    lr_multipliers(c.lr_multipliers)
  except ValueError as e:
    errors.append(str(e))
  return errors


def check_patterns(c: ml_collections.ConfigDict,
                   shapes: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """A problem for each freeze or multiplier pattern that matches no parameter of the model
  (`transfer.variable_shapes`), and for a freeze of every parameter."""
  paths = sorted(shapes['params'])
  errors = [transfer.unmatched_error('optim.freeze', p, paths, 'parameter')
            for p in c.freeze if not any(transfer.matches(p, x) for x in paths)]
  try:
    multipliers = lr_multipliers(c.lr_multipliers)
  except ValueError:
    multipliers = ()  # check_config's to report
  errors += [transfer.unmatched_error('optim.lr_multipliers', p, paths, 'parameter')
             for p, _ in multipliers if not any(transfer.matches(p, x) for x in paths)]
  if c.freeze and paths and all(transfer.matches_any(c.freeze, x) for x in paths):
    errors.append(f'optim.freeze={tuple(c.freeze)!r} freezes every parameter: nothing would train')
  return errors


def frozen_batch_norm(freeze: Sequence[str],
                      shapes: Mapping[str, Mapping[str, Any]]) -> frozenset[str]:
  """Module paths of the batch norms `optim.freeze` freezes: those whose parameters (scale, bias)
  are all frozen, or, for one without parameters, whose own path a pattern matches. They train
  with their running statistics and keep them (`cnnlab.layers.norm.frozen_batch_norm`)."""
  if not freeze:
    return frozenset()
  modules = {p.rpartition('/')[0] for p in shapes['batch_stats']}
  frozen = set()
  for module in modules:
    own = [p for p in shapes['params'] if p.rpartition('/')[0] == module]
    if own:
      is_frozen = all(transfer.matches_any(freeze, p) for p in own)
    else:
      is_frozen = transfer.matches_any(freeze, module)
    if is_frozen:
      frozen.add(module)
  return frozenset(frozen)


def standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """Runs optax under JAX's standard dtype promotion: some of its transforms mix Python floats,
  bools and int32 counts, which the strict mode our tests use (to keep our own code honest)
  refuses."""
  def init(params):
    with jax.numpy_dtype_promotion('standard'):
      return tx.init(params)

  def update(updates, state, params=None):
    with jax.numpy_dtype_promotion('standard'):
      return tx.update(updates, state, params)
  return optax.GradientTransformation(init, update)
