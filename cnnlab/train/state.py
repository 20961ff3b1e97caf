"""TrainState: every mutable thing of a run in one pytree (what is checkpointed and donated)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  """step: int32 scalar, steps taken (the data position is a function of (seed, step)).
  params, batch_stats: the model's variables (float32). opt_state: the optimizer's.
  rng: uint32[2] key, split per step by fold_in(rng, step) for dropout and augmentation.
  ema_params: moving average of params (None when optim.ema_decay == 0).
  loss_scale: float32 scalar, dynamic loss scale (1 unless dtype == 'float16').
  good_steps: int32, finite steps since the loss scale last changed.
  skips: int32, consecutive steps skipped for non-finite loss or gradients.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  ema_params: Any
  loss_scale: jax.Array
  good_steps: jax.Array
  skips: jax.Array

  @property
  def variables(self) -> dict:
    """Variables for model.apply in evaluation: the EMA parameters when there are some."""
    params = self.params if self.ema_params is None else self.ema_params
    return {'params': params, **({'batch_stats': self.batch_stats} if self.batch_stats else {})}


def create(model, tx: optax.GradientTransformation, *, seed: int, input_shape, ema: bool,
           loss_scale: float = 1.0) -> TrainState:
  """A fresh state: parameters initialised from `seed` on one (1, H, W, C) example."""
  root = jax.random.PRNGKey(seed)
  init_key, dropout_key, run_key = jax.random.split(root, 3)
  x = jnp.zeros((1, *input_shape), jnp.float32)
  variables = model.init({'params': init_key, 'dropout': dropout_key}, x, train=False)
  params = variables['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params), rng=run_key,
      ema_params=jax.tree.map(jnp.copy, params) if ema else None,
      loss_scale=jnp.asarray(loss_scale, jnp.float32), good_steps=jnp.zeros((), jnp.int32),
      skips=jnp.zeros((), jnp.int32))
