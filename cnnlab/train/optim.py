"""Optimizer and learning-rate schedule from `config.optim`, built from optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


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
  """The configured optimizer, with clipping and masked weight decay."""
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
  return standard_promotion(optax.chain(*parts))


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
