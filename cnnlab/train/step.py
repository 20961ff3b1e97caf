"""The pure training and evaluation steps.

`make_train_step(settings)` returns `train_step(state, batch) -> (state, metrics)`; every
hyperparameter is bound here, none is read from the config inside the step. The same function runs
under `jax.jit` over a mesh and under `jax.pmap` (then `settings.axis_name` names the pmap axis and
gradients are averaged with `lax.pmean`; batch-norm statistics are averaged by the model's own
`bn_axis_name`).

A batch is the data layer's dict: 'image' (B, H, W, C) uint8, the keys its task reads ('label',
'mask', 'bbox'), and optionally 'label_mix'/'mix_weight' (mixup, cutmix), 'valid' (evaluation
padding), 'index', 'epoch'. What the model's output means is the task's business
(`settings.task`, a cnnlab.tasks.Task): the steps only ask it for the model's extra inputs
(`Task.model_inputs`, e.g. a detector's training targets), the loss, and the evaluation's sums and
records.

Random streams of the update, each folded from (state.rng, state.step) and, under pmap, the
device's index: 0 augmentation (of the global batch, so not per device), 1 'dropout', 2 'sample'
(what a model draws in training besides dropout masks, e.g. a detector's anchor and RoI samples).
A model that draws nothing ignores 'sample', so adding it changed no other model's numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from cnnlab.data import augment
from cnnlab.layers import norm
from cnnlab.train.state import TrainState

# fp16 dynamic loss scaling (what optax lacks): double after this many finite steps, halve on
# overflow, never below 1.
LOSS_SCALE_PERIOD = 2000


@dataclasses.dataclass(frozen=True)
class StepSettings:
  model: Any  # flax module
  tx: optax.GradientTransformation
  learning_rate: optax.Schedule
  task: Any  # cnnlab.tasks.Task
  mean: tuple[float, ...]  # per-channel input normalisation, 0..1 scale
  std: tuple[float, ...]
  augment: dict  # config.data.augment as a plain dict
  compute_dtype: Any = jnp.float32
  aux_loss_weight: float = 0.3
  ema_decay: float = 0.0
  dynamic_loss_scale: bool = False
  axis_name: str | None = None  # pmap axis; None under jit
  # Module paths of the batch norms optim.freeze froze: they train with their running statistics
  # and keep them (cnnlab.layers.norm.frozen_batch_norm, entered around model.apply when traced).
  frozen_batch_norm: frozenset[str] = frozenset()


def aux_outputs(intermediates) -> list[jax.Array]:
  """Auxiliary heads' outputs, trained by the task's loss like the main output: the top-level
  intermediates named 'aux*_logits' (GoogLeNet's)."""
  return [v[0] for k, v in sorted(intermediates.items())
          if k.startswith('aux') and k.endswith('_logits')]


def preprocess(state: TrainState, batch: dict, settings: StepSettings) -> tuple[jax.Array, dict]:
  """Augments the (global) batch with this step's key and normalises it: (images, batch)."""
  aug_key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0)
  batch = augment.apply(settings.augment, aug_key, batch)
  images = augment.normalize(batch['image'], settings.mean, settings.std, settings.compute_dtype)
  return images, batch


def _flat(tree) -> jax.Array:
  """Every float of a tree in one float32 vector (one copy, one reduction: a reduction per leaf
  is a kernel per leaf, which XLA:CPU compiles one by one)."""
  return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)])


def all_finite(tree) -> jax.Array:
  """Whether every value of a tree is finite (the largest magnitude is; NaN propagates)."""
  return jnp.isfinite(jnp.max(jnp.abs(_flat(tree))))


def global_norm(tree) -> jax.Array:
  """The L2 norm of a whole tree (optax.tree.norm's value)."""
  flat = _flat(tree)
  return jnp.sqrt(jnp.sum(flat * flat))


def make_train_step(settings: StepSettings) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """train_step(state, batch) -> (state, metrics) for a batch of raw (uint8) images: `preprocess`,
  then `make_update`'s update. (pmap runs the two apart: it preprocesses the global batch on every
  device, then updates on the device's slice; see cnnlab.parallel.)"""
  update = make_update(settings)

  def train_step(state: TrainState, batch: dict):
    return update(state, *preprocess(state, batch, settings))
  return train_step


def make_update(settings: StepSettings) -> Callable[[TrainState, jax.Array, dict],
                                                    tuple[TrainState, dict]]:
  """update(state, images, batch) -> (state, metrics): the gradient step on preprocessed images."""
  model, tx, task = settings.model, settings.tx, settings.task

  def update(state: TrainState, images: jax.Array, batch: dict):
    step_key = jax.random.fold_in(state.rng, state.step)
    dropout_key, sample_key = (jax.random.fold_in(step_key, i) for i in (1, 2))
    if settings.axis_name:
      # pmap: each device draws masks for its own slice; without its index in the key every
      # device would drop the same units of its i-th example. (Under jit the masks are drawn for
      # the global batch, as on one device; pmap's are other draws of the same distribution.)
      index = lax.axis_index(settings.axis_name)
      dropout_key, sample_key = (jax.random.fold_in(k, index) for k in (dropout_key, sample_key))
    inputs = task.model_inputs(batch, train=True)

    def loss_fn(params):
      variables = {'params': params, **({'batch_stats': state.batch_stats} if state.batch_stats else {})}
      with norm.frozen_batch_norm(settings.frozen_batch_norm):
        outputs, updates = model.apply(variables, images, train=True,
                                       rngs={'dropout': dropout_key, 'sample': sample_key},
                                       mutable=['batch_stats', 'intermediates'], **inputs)
      task.check_outputs(outputs, images)  # at trace time: a misfit fails before compiling
      loss, task_metrics = task.loss(outputs, batch)
      for aux in aux_outputs(updates.get('intermediates', {})):
        loss = loss + settings.aux_loss_weight * task.loss(aux, batch)[0]
      return loss * state.loss_scale, (loss, task_metrics, updates.get('batch_stats', {}))

    grads, (loss, task_metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    if settings.axis_name:
      grads, loss, task_metrics = lax.pmean((grads, loss, task_metrics), settings.axis_name)
    grads = jax.tree.map(lambda g: g / state.loss_scale, grads)
    finite_grads = all_finite(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The update itself must be finite too (an overflowing step or learning rate counts).
    finite = finite_grads & jnp.isfinite(loss) & all_finite(updates)
    ema = state.ema_params
    if ema is not None:
      ema = optax.incremental_update(params, ema, step_size=1.0 - settings.ema_decay)
    # A non-finite update is never applied: everything but the step (the data position) stays.
    # One conditional over the whole trees, not a select per leaf: XLA:CPU compiles GoogLeNet's
    # step several times slower with 187 selects that all wait on one global flag
    # (bench/README.md, "Compile time: GoogLeNet's initial state and train step").
    kept = lax.cond(finite, lambda: (params, batch_stats, opt_state, ema),
                    lambda: (state.params, state.batch_stats, state.opt_state, state.ema_params))
    scale, good = state.loss_scale, state.good_steps
    if settings.dynamic_loss_scale:
      grow = finite & (good + 1 >= LOSS_SCALE_PERIOD)
      scale = jnp.where(finite, jnp.where(grow, scale * 2.0, scale), jnp.maximum(scale / 2.0, 1.0))
      good = jnp.where(finite & ~grow, good + 1, 0)
    # An fp16 overflow (finite loss, infinite gradients) is the loss scaler's business, not a fault.
    overflow = ~finite_grads & jnp.isfinite(loss) & settings.dynamic_loss_scale
    fault = ~finite & ~overflow
    new_state = state.replace(
        step=state.step + 1, params=kept[0], batch_stats=kept[1], opt_state=kept[2],
        ema_params=kept[3], loss_scale=scale, good_steps=good, skips=jnp.where(fault, state.skips + 1, 0))
    metrics = {'loss': loss, **task_metrics, 'learning_rate': settings.learning_rate(state.step),
               'grad_norm': global_norm(grads), 'nonfinite': fault.astype(jnp.int32),
               'skips': new_state.skips}
    if settings.dynamic_loss_scale:
      metrics['loss_scale'] = scale
    return new_state, metrics

  return update


def make_eval_step(settings: StepSettings) -> Callable[[TrainState, dict], tuple[dict, Any]]:
  """eval_step(state, batch) -> (sums, records).

  sums: the task's sums over the batch's valid rows (`Task.eval_sums`): sums, not means, so that
  batches of any padding and devices combine exactly. records: None, or for a task with
  `Task.eval_records`, (its per-example arrays, valid (B,) bool) of the whole batch, padding
  included (the host drops it). Under pmap the sums are psummed and the records all-gathered in
  device order, so every strategy returns the global batch's. Uses the EMA parameters when the
  state has them."""
  model, task = settings.model, settings.task

  def eval_step(state: TrainState, batch: dict):
    images = augment.normalize(batch['image'], settings.mean, settings.std, settings.compute_dtype)
    outputs = model.apply(state.variables, images, train=False,
                          **task.model_inputs(batch, train=False))
    task.check_outputs(outputs, images)
    valid = (batch['valid'] if 'valid' in batch else jnp.ones(images.shape[:1], bool))
    sums = task.eval_sums(outputs, batch, valid.astype(jnp.float32))
    records = task.eval_records(outputs, batch)
    if records is not None:
      records = (records, valid.astype(bool))
    if settings.axis_name:
      sums = lax.psum(sums, settings.axis_name)
      records = lax.all_gather(records, settings.axis_name, tiled=True)
    return sums, records

  return eval_step
