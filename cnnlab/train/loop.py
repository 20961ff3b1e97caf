"""`train_and_evaluate(config, workdir)`: the whole run, from a validated config to summary.json.

The loop is: place the data and state, compile the step once, then repeat the jitted step. The
only host syncs are at logging, evaluation and checkpoint boundaries. A workdir holds config.json,
metrics.jsonl, tensorboard/, checkpoints/ and, at the end, summary.json.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnnlab import checkpoint, data, models, parallel
from cnnlab import config as config_lib
from cnnlab.train import optim, resume, state as state_lib, step as step_lib
from cnnlab.train.logging import MetricWriter, Progress

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


class NonFiniteError(FloatingPointError):
  """Training produced a non-finite loss or gradient (train.on_nonfinite)."""


def compilation_cache(config: ml_collections.ConfigDict) -> str | None:
  """Turns on JAX's persistent compilation cache; returns its directory (None when off)."""
  directory = config.compilation_cache_dir
  if directory is None:
    directory = os.environ.get('CNNLAB_COMPILATION_CACHE',
                               os.path.join(os.path.expanduser('~'), '.cache', 'cnnlab', 'jax'))
  if not directory:
    return None
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return directory


def build_model(config: ml_collections.ConfigDict, num_classes: int, axis_name: str | None = None):
  """The configured model, with the compute dtype and pmap's batch-norm axis where it takes them."""
  models.import_modules(config.model.imports)
  kwargs = {**config_lib.model_kwargs(config), 'num_classes': num_classes}
  fields = models.get_spec(config.model.name).fields
  if 'dtype' in fields and 'dtype' not in kwargs:
    kwargs['dtype'] = DTYPES[config.dtype]
  if axis_name and 'bn_axis_name' in fields:
    kwargs['bn_axis_name'] = axis_name
  return models.create_model(config.model.name, **kwargs)


@dataclasses.dataclass
class Run:
  """Everything built from a config before the first step (also used by tests and benchmarks)."""
  config: ml_collections.ConfigDict
  info: Any
  num_classes: int
  model: Any
  par: parallel.Parallel
  train_data: Any
  eval_data: Any
  settings: step_lib.StepSettings
  total_steps: int
  steps_per_epoch: int
  eval_every: int

  def initial_state(self) -> state_lib.TrainState:
    return jax.jit(lambda: state_lib.create(
        self.model, self.settings.tx, seed=self.config.seed, input_shape=self.info.image_shape,
        ema=self.config.optim.ema_decay > 0,
        loss_scale=2.0 ** 15 if self.config.dtype == 'float16' else 1.0))()

  def compile_train(self, state):
    """(run, data_arg): run(state, data_arg) -> (state, metrics) draws and trains batch `step`."""
    train_step = step_lib.make_train_step(self.settings)
    if self.train_data.kind != 'device':
      return self.par.compile_train(train_step, None, state, None), None
    if self.par.strategy == 'pmap':  # each device draws the unsharded global batch, then slices
      batch_fn = functools.partial(data.device_batch, seed=self.config.seed,
                                   batch_size=self.config.train.batch_size,
                                   num_examples=self.train_data.num_examples)
      arrays = self.par.place_replicated(self.train_data.arrays)
    else:
      batch_fn, arrays = self.train_data.batch_fn(), self.train_data.arrays
    return self.par.compile_train(train_step, batch_fn, state, arrays), arrays

  def evaluate(self, eval_fn, state) -> dict[str, float]:
    """Mean loss and accuracy over the whole evaluation split (padding excluded)."""
    total = None
    for batch in self.eval_data.eval_batches():
      sums = eval_fn(state, batch)
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    total = parallel.fetch(total)
    return {'loss': total['loss'] / total['count'], 'accuracy': total['correct'] / total['count']}


def setup(config: ml_collections.ConfigDict) -> Run:
  """Validates the config and builds the model, data pipelines and step settings."""
  facts = config_lib.validate(config)
  info, num_classes = facts['info'], facts['num_classes']
  par = parallel.Parallel.create(config.parallel.strategy, config.parallel.num_devices,
                                 config.parallel.fsdp)
  model = build_model(config, num_classes, par.axis_name)
  batch_size = config.train.batch_size
  eval_batch = config.train.eval_batch_size or batch_size
  common = dict(seed=config.seed, sharding_replicated=par.replicated,
                sharding_batch=par.batch_sharding)
  train_data = data.make_pipeline(config.data, split=config.data.train_split,
                                  batch_size=batch_size, **common)
  eval_data = data.make_pipeline(config.data, split=config.data.eval_split,
                                 batch_size=min(eval_batch, info.splits[config.data.eval_split]
                                                // par.num_devices * par.num_devices or eval_batch),
                                 shuffle=False, **common)
  steps_per_epoch = train_data.steps_per_epoch
  total = config.train.num_steps or math.ceil(config.train.num_epochs * steps_per_epoch)
  lr = optim.schedule(config.optim, total, steps_per_epoch)
  mean, std = data.augment.normalization(config.data, info)
  settings = step_lib.StepSettings(
      model=model, tx=optim.optimizer(config.optim, lr), learning_rate=lr,
      num_classes=num_classes, mean=mean, std=std, augment=config.data.augment.to_dict(),
      compute_dtype=DTYPES[config.dtype], label_smoothing=config.train.label_smoothing,
      aux_loss_weight=config.train.aux_loss_weight, ema_decay=config.optim.ema_decay,
      dynamic_loss_scale=config.dtype == 'float16', axis_name=par.axis_name)
  return Run(config, info, num_classes, model, par, train_data, eval_data, settings, total,
             steps_per_epoch, config.train.eval_every_steps or steps_per_epoch)


def _first_batch_check(run: Run, start_step: int) -> None:
  batch = (run.train_data.batch(start_step) if run.train_data.kind == 'device'
           else next(iter(run.train_data.iterate(start_step))))
  data.check_batch(batch, image_shape=run.info.image_shape, num_classes=run.num_classes)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates as `config` says, writing into `workdir`; returns summary.json's dict.

  A workdir with checkpoints is resumed from its latest one.
  """
  started = time.time()
  compilation_cache(config)
  run = setup(config)
  primary = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  lock = resume.WorkdirLock(workdir) if primary else None
  ckpt = preemption = None
  try:
    # Resume: the latest committed checkpoint (partial saves of a killed run are removed first).
    ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep,
                                   best_metric=config.checkpoint.best_metric,
                                   best_mode=config.checkpoint.best_mode)
    preemption = resume.PreemptionWatch(ckpt)  # SIGTERM from here on: save, then exit 75
    resume_step = ckpt.latest_step()
    if resume_step is not None:
      resume.check_resume_config(workdir, config, resume_step)
      if resume_step > run.total_steps:
        raise config_lib.ConfigError(
            f'{workdir} has a checkpoint at step {resume_step}, past the {run.total_steps} steps '
            'this config trains; raise train.num_steps/num_epochs or use a new --workdir')
    if primary:
      checkpoint.atomic_write(checkpoint.safe_join(workdir, 'config.json'),
                              config_lib.to_json(config))
      resume.record_launch(workdir, resume_step or 0)

    state = run.initial_state()
    num_params = int(sum(np.size(p) for p in jax.tree.leaves(state.params)))
    # What logging and best tracking carry over a restart, so a resumed run writes exactly the
    # records of an uninterrupted one: the train metrics of the steps since the last record.
    pending, interval_step, best, final = [], 0, None, None
    if resume_step is not None:
      state, record = ckpt.restore(state, resume_step)
      pending = resume.decode_metrics(record.get('pending', {}))
      interval_step = record.get('interval_step', resume_step)
      best, final = record.get('best'), record.get('final')
      if primary:
        resume.truncate_metrics(workdir, resume_step)
    start_step = int(state.step)
    _first_batch_check(run, start_step)
    state = run.par.place_state(state)
    train_fn, data_arg = run.compile_train(state)
    eval_fn = run.par.compile_eval(step_lib.make_eval_step(run.settings), state)
    setup_time = time.time() - started

    # A host (grain) pipeline: its first batch is drawn now, compiled against, and trained on first.
    batch_iter = None
    if data_arg is None:
      batches = run.train_data.iterate(start_step)
      first = next(batches)
      batch_iter = itertools.chain([first], batches)
    t = time.time()
    if run.par.strategy == 'jit':
      train_fn = train_fn.lower(state, data_arg if batch_iter is None else first).compile()
    compile_time = time.time() - t

    writer = MetricWriter(workdir, config.log.tensorboard,
                          purge_step=None if resume_step is None else resume_step + 1)
  except BaseException:
    for closing in (preemption and preemption.close, ckpt and ckpt.close,
                    lock and lock.release):
      if closing:
        closing()
    raise

  def save(done: int, evaluated: dict | None) -> None:
    loop_record = {'pending': resume.encode_metrics(pending), 'interval_step': interval_step,
                   'best': best, 'final': final}
    ckpt.save(done, run.par.unreplicate(state), loop=loop_record, metrics=evaluated)

  progress = Progress(run.total_steps, start_step, config.log.progress)
  train_time = eval_time = 0.0
  interval_start = time.time()
  try:
    for step in range(start_step, run.total_steps):
      batch = data_arg if batch_iter is None else next(batch_iter)
      state, metrics = train_fn(state, batch)
      pending.append(metrics)
      done = step + 1
      if done % config.train.log_every_steps == 0 or done == run.total_steps:
        values = parallel.fetch(jax.tree.map(lambda *xs: jnp.stack(xs), *pending))
        pending = []
        elapsed = time.time() - interval_start
        train_time += elapsed
        _check_finite(config, values, interval_step, done)
        record = {k: float(np.mean(v)) for k, v in values.items() if k not in ('nonfinite', 'skips')}
        record['nonfinite'] = int(np.sum(values['nonfinite']))
        record['images_per_sec'] = (done - interval_step) * config.train.batch_size / elapsed
        record['step_time_s'] = elapsed / (done - interval_step)
        writer.write('train', done, record)
        progress.update(done, f"loss {record['loss']:.4f}  {record['images_per_sec']:.0f} img/s")
        interval_start, interval_step = time.time(), done
      evaluated, improved = None, False
      if done % run.eval_every == 0 or done == run.total_steps:
        t = time.time()
        result = run.evaluate(eval_fn, state)
        eval_time += time.time() - t
        writer.write('eval', done, result)
        final = evaluated = {**result, 'step': done}
        if best is None or _better(config, result, best):
          best, improved = final, True
        interval_start = time.time()  # evaluation is not training time
      # Checkpoints: periodic, at each new best evaluation (so the best is on disk), on SIGTERM.
      stop = preemption.requested(done)
      periodic = config.checkpoint.every_steps and done % config.checkpoint.every_steps == 0
      if periodic or stop or (improved and config.checkpoint.best_metric):
        save(done, evaluated)
      if stop:
        ckpt.wait()
        print(f'cnnlab: SIGTERM: checkpoint at step {done} committed in {workdir}; exiting with '
              f'{checkpoint.EXIT_PREEMPTED} so the launcher requeues (the next launch resumes)',
              file=sys.stderr, flush=True)
        raise checkpoint.Preempted(done, workdir)
    if ckpt.latest_step() != run.total_steps:
      save(run.total_steps, final if final and final['step'] == run.total_steps else None)
    ckpt.wait()
  finally:
    progress.close()
    writer.close()
    preemption.close()
    try:
      ckpt.close()
    finally:
      if lock:
        lock.release()

  summary = {
      'final_eval': final, 'best_eval': best, 'num_params': num_params,
      'steps': run.total_steps, 'start_step': start_step,
      'compile_time_s': compile_time, 'setup_time_s': setup_time,
      'train_time_s': train_time, 'eval_time_s': eval_time,
      'wall_time_s': time.time() - started,
      'images_per_sec': ((run.total_steps - start_step) * config.train.batch_size / train_time
                         if train_time else None),
      'num_devices': run.par.num_devices, 'num_processes': jax.process_count(),
  }
  if primary:
    checkpoint.atomic_write(os.path.join(workdir, 'summary.json'), json.dumps(summary, indent=2))
  return summary


def _better(config, result: dict, best: dict) -> bool:
  key = config.checkpoint.best_metric
  return result[key] > best[key] if config.checkpoint.best_mode == 'max' else result[key] < best[key]


def _check_finite(config, values: dict, first: int, last: int) -> None:
  """Applies train.on_nonfinite to the steps (first, last] just fetched."""
  bad = int(np.sum(values['nonfinite']))
  if not bad:
    return
  if config.train.on_nonfinite == 'halt':
    raise NonFiniteError(f'non-finite loss or gradients in steps {first + 1}..{last} '
                         f'({bad} step(s)); the update was not applied '
                         '(set train.on_nonfinite=skip to skip such steps)')
  if int(np.max(values['skips'])) >= config.train.max_consecutive_skips:
    raise NonFiniteError(f'{int(np.max(values["skips"]))} consecutive non-finite steps up to '
                         f'step {last} (train.max_consecutive_skips='
                         f'{config.train.max_consecutive_skips})')


__all__ = ['train_and_evaluate', 'setup', 'build_model', 'NonFiniteError']
