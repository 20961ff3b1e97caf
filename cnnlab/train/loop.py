"""`train_and_evaluate(config, workdir)`: the whole run, from a validated config to summary.json.

The loop is: place the data and state, compile the step once, then repeat the compiled step. The
only host syncs are at logging, evaluation and checkpoint boundaries. What a run directory holds
is `cnnlab.workdir`'s business; nothing is written into it before the state is restored (or
created), so a launch that fails on the way leaves a run directory as it found it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnnlab import analysis, data, models, parallel, platforms, tasks, workdir as workdir_lib
from cnnlab import config as config_lib
from cnnlab.train import (checkpoint, checks, images as images_lib, optim, resume,
                          state as state_lib, step as step_lib, transfer)
from cnnlab.train.logging import MetricWriter, Progress


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


@dataclasses.dataclass
class Run:
  """Everything built from a config before the first step (also used by tests and benchmarks)."""
  config: ml_collections.ConfigDict
  info: Any
  num_classes: int | None  # the model's outputs (None: a model of pixels)
  model: Any
  par: parallel.Parallel
  train_data: Any
  eval_data: Any
  settings: step_lib.StepSettings
  total_steps: int
  steps_per_epoch: int
  eval_every: int

  def initial_state(self) -> state_lib.TrainState:
    """A fresh TrainState from one compiled computation. It runs once per run, so on a CPU it is
    compiled at XLA's lowest backend optimisation: GoogLeNet's (187 random tensors) then
    compiles about 3x faster (bench/README.md, "Compile time: GoogLeNet's initial state and train
    step")."""
    create = jax.jit(platforms.traced_for(self.par.platform, lambda: state_lib.create(
        self.model, self.settings.tx, seed=self.config.seed, input_shape=self.info.image_shape,
        ema=self.config.optim.ema_decay > 0,
        loss_scale=2.0 ** 15 if self.config.dtype == 'float16' else 1.0)))
    options = {'xla_backend_optimization_level': 0} if self.par.platform == 'cpu' else None
    return create.lower().compile(compiler_options=options)()

  def compile_eval(self, state):
    """`eval_fn(state, batch) -> (sums, records)` of a global evaluation batch (what `evaluate`
    takes; cnnlab.train.step.make_eval_step under this run's strategy)."""
    return self.par.compile_eval(step_lib.make_eval_step(self.settings), state)

  def compile_train(self, state, first_batch: dict | None = None):
    """(run, data_arg), compiled now: run(state, data_arg) -> (state, metrics) trains the batch of
    `state.step`. The device pipeline draws it inside the step from data_arg (its arrays); a host
    pipeline passes each batch as data_arg (None here) and needs its `first_batch` to compile."""
    preprocess = functools.partial(step_lib.preprocess, settings=self.settings)
    update = step_lib.make_update(self.settings)
    if self.train_data.kind != 'device':
      if first_batch is None:
        raise ValueError('a host pipeline compiles against its first batch: pass first_batch')
      return self.par.compile_train(preprocess, update, None, state, first_batch), None
    if self.par.strategy == 'pmap':  # each device draws the unsharded global batch, then slices
      batch_fn = functools.partial(data.device_batch, seed=self.config.seed,
                                   batch_size=self.config.train.batch_size,
                                   num_examples=self.train_data.num_examples)
      arrays = self.par.place_replicated(self.train_data.arrays)
    else:
      batch_fn, arrays = self.train_data.batch_fn(), self.train_data.arrays
    return self.par.compile_train(preprocess, update, batch_fn, state, arrays), arrays

  @property
  def task(self) -> tasks.Task:
    return self.settings.task

  def evaluate(self, eval_fn, state) -> tuple[dict[str, float], dict[str, Any]]:
    """The task's metrics over the whole evaluation split, padding excluded (the loss and e.g.
    accuracy, or mIoU, or COCO's AP), and its details for summary.json (e.g. the confusion
    matrix). Sums are added on the devices and fetched once; a task's records (`eval_fn` gives
    (sums, records)) are fetched batch by batch, one batch behind the devices so that the host's
    accumulation overlaps the next batch's computation, and accumulated in split order."""
    task = self.task
    total, accumulator, behind = None, task.new_accumulator(tuple(self.info.image_shape)), None
    for batch in self.eval_data.eval_batches():
      sums, records = eval_fn(state, batch)
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
      if behind is not None:
        accumulator = task.accumulate(accumulator, parallel.fetch_rows(behind))
      behind = records
    if behind is not None:
      accumulator = task.accumulate(accumulator, parallel.fetch_rows(behind))
    sums = parallel.fetch(total)
    return task.finalize(sums) if accumulator is None else task.finalize(sums, accumulator)


def setup(config: ml_collections.ConfigDict) -> Run:
  """Validates the config and builds the model, data pipelines and step settings."""
  facts = config_lib.validate(config)
  info, num_classes = facts['info'], facts['num_classes']
  task = tasks.create(config, num_classes, info.class_names)
  par = parallel.Parallel.create(config.parallel.strategy, config.parallel.num_devices,
                                 config.parallel.fsdp)
  model = models.from_config(config, num_classes, par.axis_name)
  checks.check_outputs(model, task, info.image_shape)
  variables = checks.check_parameter_keys(config, model, info.image_shape)
  batch_size = config.train.batch_size
  eval_batch = config.train.eval_batch_size or batch_size
  common = dict(seed=config.seed, sharding_replicated=par.replicated,
                sharding_batch=par.batch_sharding)
  train_data = data.make_pipeline(config.data, split=config.data.train_split,
                                  batch_size=batch_size,
                                  examples_per_class=config.data.examples_per_class, **common)
  eval_data = data.make_pipeline(config.data, split=config.data.eval_split,
                                 batch_size=min(eval_batch, info.splits[config.data.eval_split]
                                                // par.num_devices * par.num_devices or eval_batch),
                                 shuffle=False, **common)
  steps_per_epoch = train_data.steps_per_epoch
  total = config.train.num_steps or math.ceil(config.train.num_epochs * steps_per_epoch)
  lr = optim.schedule(config.optim, total, steps_per_epoch)
  frozen_bn = frozenset()
  if config.optim.freeze:
    frozen_bn = optim.frozen_batch_norm(config.optim.freeze, variables)
  mean, std = data.augment.normalization(config.data, info)
  settings = step_lib.StepSettings(
      model=model, tx=optim.optimizer(config.optim, lr), learning_rate=lr, task=task,
      mean=mean, std=std, augment=config.data.augment.to_dict(),
      compute_dtype=models.DTYPES[config.dtype], aux_loss_weight=config.train.aux_loss_weight,
      ema_decay=config.optim.ema_decay,
      dynamic_loss_scale=config.dtype == 'float16', axis_name=par.axis_name,
      frozen_batch_norm=frozen_bn)
  return Run(config, info, num_classes, model, par, train_data, eval_data, settings, total,
             steps_per_epoch, config.train.eval_every_steps or steps_per_epoch)


def model_facts(run: Run) -> dict[str, Any]:
  """model.json: what the run's model takes and gives, so a run directory loads and reports on
  its own (no dataset, no model code needed to read it): input shape, the task and its headline
  metric, the model's classes and the dataset's class names, the input normalisation,
  parameters, MACs per example and receptive field (None where the analysis cannot follow the
  model)."""
  metric, mode = tasks.headline(run.config)
  facts = {'model': run.config.model.name, 'image_shape': list(run.info.image_shape),
           'task': run.task.name, 'headline': {'metric': metric, 'mode': mode},
           'num_classes': run.num_classes,
           'class_names': None if run.info.class_names is None else list(run.info.class_names),
           'mean': list(run.settings.mean),
           'std': list(run.settings.std)}
  try:
    summary = analysis.summarize(run.model, run.info.image_shape)
    rf = summary.receptive_field
    facts.update(num_params=summary.total_params, macs=summary.total_macs,
                 receptive_field=None if rf is None else list(rf))
  except Exception as e:  # noqa: BLE001 - a user's model the analysis cannot follow
    facts.update(num_params=None, macs=None, receptive_field=None,
                 analysis_error=f'{type(e).__name__}: {e}')
  return facts


def _prepare_workdir(path: str) -> None:
  """Creates the run directory, or says in one line why it cannot be one."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise config_lib.ConfigError(f'--workdir {path!r} is a file, not a directory')
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise config_lib.ConfigError(f'--workdir {path!r} cannot be created: {e.strerror}') from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise config_lib.ConfigError(f'--workdir {path!r} is not writable')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       config_file: str | None = None) -> dict[str, Any]:
  """Trains and evaluates as `config` says, writing into `workdir`; returns summary.json's dict.

  A workdir with checkpoints is resumed from its latest one; a finished run (summary.json, last
  step reached) is left as it is and its summary returned. `config_file` (the experiment file,
  when there is one) is recorded with the launch.
  """
  started = time.time()
  compilation_cache(config)
  run = setup(config)
  primary = jax.process_index() == 0
  _prepare_workdir(workdir)
  lock = workdir_lib.WorkdirLock(workdir) if primary else None
  ckpt = preemption = None
  recorded = False  # whether provenance.json lists this launch (then it says how it ended)
  try:
    best_metric, best_mode = tasks.headline(config)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep,
                                   best_metric=best_metric, best_mode=best_mode)
    resume_step = ckpt.latest_step()
    if resume_step is not None:
      resume.check_resume_config(workdir, config, resume_step)
      if resume_step > run.total_steps:
        raise config_lib.ConfigError(
            f'{workdir} has a checkpoint at step {resume_step}, past the {run.total_steps} steps '
            'this config trains; raise train.num_steps/num_epochs or use a new --workdir')
      finished = workdir_lib.read_json(os.path.join(workdir, workdir_lib.SUMMARY))
      if resume_step == run.total_steps and finished is not None:
        if primary:
          print(f'cnnlab: {workdir} is already finished ({run.total_steps} steps); nothing to do',
                file=sys.stderr, flush=True)
        return finished
      resume.warn_schedule_change(workdir, config, resume_step)

    state = run.initial_state()
    transferred = None  # what transfer.init_from copied (transfer.json)
    if resume_step is None and config.transfer.init_from:
      # Only when the run starts: a resumed run continues from its own checkpoint.
      state, transferred = transfer.initialize(state, config.transfer, config.model.name)
      if primary:
        print(transfer.summary_line(transferred), file=sys.stderr, flush=True)
    # What logging and best tracking carry over a restart, so a resumed run writes exactly the
    # records of an uninterrupted one: the train metrics of the steps since the last record.
    pending, interval_step, best, final, details, launches = [], 0, None, None, None, []
    if resume_step is not None:
      ckpt.check_shapes(state, resume_step)  # a mismatch fails here, naming the tensors
      state, record = ckpt.restore(state, resume_step)
      pending = resume.decode_metrics(record.get('pending', {}))
      interval_step = record.get('interval_step', resume_step)
      best, final = record.get('best'), record.get('final')
      # (a checkpoint written before tasks existed kept only a classifier's confusion matrix)
      details = record.get('details', {'confusion': record.get('confusion')})
      launches = record.get('launches', [])
    start_step = int(state.step)
    # The state exists: from here on the launch may write into the run directory.
    facts = model_facts(run)
    if primary:
      workdir_lib.atomic_write(workdir_lib.safe_join(workdir, workdir_lib.CONFIG),
                               config_lib.to_json(config))
      workdir_lib.write_json(workdir_lib.safe_join(workdir, workdir_lib.MODEL), facts)
      if transferred is not None:
        workdir_lib.write_json(workdir_lib.safe_join(workdir, transfer.TRANSFER_FILE), transferred)
      resume.record_launch(workdir, start_step, run.total_steps, config_file)
      recorded = True
      if resume_step is not None:
        workdir_lib.truncate_metrics(workdir, resume_step)
    preemption = resume.PreemptionWatch(ckpt)  # SIGTERM from here on: save, then exit 75
    num_params = int(sum(np.size(p) for p in jax.tree.leaves(state.params)))

    # A host (grain) pipeline's first batch is drawn now, checked, compiled against and trained
    # on first; the device pipeline's is checked as the step will draw it.
    batch_iter = first = None
    if run.train_data.kind == 'device':
      data.check_batch(run.train_data.batch(start_step), image_shape=run.info.image_shape,
                       num_classes=run.info.num_classes)
    else:
      batches = run.train_data.iterate(start_step)
      first = next(batches)
      data.check_batch(first, image_shape=run.info.image_shape, num_classes=run.info.num_classes)
      batch_iter = itertools.chain([first], batches)
    images = images_lib.TrainImages.create(run, state.variables) if config.log.images else None
    state = run.par.place_state(state)
    setup_time = time.time() - started
    t = time.time()
    train_fn, data_arg = run.compile_train(state, first)
    compile_time = time.time() - t
    eval_fn = run.compile_eval(state)
    writer = MetricWriter(workdir, config.log.tensorboard,
                          purge_step=None if resume_step is None else resume_step + 1)
  except BaseException as e:
    if primary and recorded:
      resume.end_launch(workdir, start_step, time.time() - started, *_outcome(e))
    for closing in (preemption and preemption.close, ckpt and ckpt.close,
                    lock and lock.release):
      if closing:
        closing()
    raise

  train_time = eval_time = 0.0

  def this_launch(end_step: int) -> dict:
    trained = (end_step - start_step) * config.train.batch_size
    return {'start_step': start_step, 'end_step': end_step, 'setup_time_s': setup_time,
            'compile_time_s': compile_time, 'train_time_s': train_time, 'eval_time_s': eval_time,
            'wall_time_s': time.time() - started,
            'images_per_sec': trained / train_time if train_time else None,
            'num_devices': run.par.num_devices, 'num_processes': jax.process_count()}

  def save(done: int, evaluated: dict | None) -> None:
    loop_record = {'pending': resume.encode_metrics(pending), 'interval_step': interval_step,
                   'best': best, 'final': final, 'details': details,
                   'launches': [*launches, this_launch(done)]}
    ckpt.save(done, run.par.unreplicate(state), loop=loop_record, metrics=evaluated)

  progress = Progress(run.total_steps, start_step, config.log.progress)
  interval_start = time.time()
  reached, ended = start_step, None  # how far this launch came, what ended it (provenance.json)
  try:
    for step in range(start_step, run.total_steps):
      batch = data_arg if batch_iter is None else next(batch_iter)
      state, metrics = train_fn(state, batch)
      pending.append(metrics)
      reached = done = step + 1
      progress.advance(done)
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
        progress.train(done, record)
        interval_start, interval_step = time.time(), done
      evaluated, improved = None, False
      if done % run.eval_every == 0 or done == run.total_steps:
        t = time.time()
        result, details = run.evaluate(eval_fn, state)
        eval_time += time.time() - t
        writer.write('eval', done, result)
        progress.evaluated(done, result)
        if images is not None:  # drawn after the evaluation, outside its time
          writer.write_images(done, images.render(run.par.unreplicate(state).variables))
        final = evaluated = {**result, 'step': done}
        if best is None or _better(best_metric, best_mode, result, best):
          best, improved = final, True
        interval_start = time.time()  # evaluation is not training time
      # Checkpoints: periodic, at each new best evaluation (so the best is on disk), on SIGTERM.
      stop = preemption.requested(done)
      periodic = config.checkpoint.every_steps and done % config.checkpoint.every_steps == 0
      if periodic or stop or (improved and best_metric):
        save(done, evaluated)
      if stop:
        ckpt.wait()
        print(f'cnnlab: SIGTERM: checkpoint at step {done} committed in {workdir}; exiting with '
              f'{workdir_lib.EXIT_PREEMPTED} so the launcher requeues (the next launch resumes)',
              file=sys.stderr, flush=True)
        raise checkpoint.Preempted(done, workdir)
    if ckpt.latest_step() != run.total_steps:
      save(run.total_steps, final if final and final['step'] == run.total_steps else None)
    ckpt.wait()
  except BaseException as e:
    ended = e
    raise
  finally:
    progress.close()
    writer.close()
    preemption.close()
    try:
      ckpt.close()
    finally:
      if primary:
        resume.end_launch(workdir, reached, time.time() - started, *_outcome(ended))
      if lock:
        lock.release()

  summary = _summary(run, facts, final, best, details, num_params,
                     [*launches, this_launch(run.total_steps)])
  if primary:
    workdir_lib.write_json(os.path.join(workdir, workdir_lib.SUMMARY), summary)
  return summary


def _summary(run: Run, facts: dict, final, best, details, num_params: int,
             launches: list[dict]) -> dict[str, Any]:
  """summary.json: what the run achieved and what it cost, summed over its launches (each one
  listed), with the model's figures from model.json and the final evaluation's details as the
  task shows them (per-class accuracy and the confusion matrix; IoU per class; ...)."""
  total = lambda key: sum(launch[key] for launch in launches)  # noqa: E731
  trained = sum(launch['end_step'] - launch['start_step'] for launch in launches)
  train_time = total('train_time_s')
  return {
      'task': run.task.name, 'headline': facts['headline'],
      'final_eval': final, 'best_eval': best, 'num_params': num_params,
      'macs': facts['macs'], 'receptive_field': facts['receptive_field'],
      'steps': run.total_steps,
      'compile_time_s': total('compile_time_s'), 'setup_time_s': total('setup_time_s'),
      'train_time_s': train_time, 'eval_time_s': total('eval_time_s'),
      'wall_time_s': total('wall_time_s'),
      'images_per_sec': trained * run.config.train.batch_size / train_time if train_time else None,
      'num_devices': launches[-1]['num_devices'], 'num_processes': launches[-1]['num_processes'],
      'launches': launches,
      **run.task.summary(details),
  }


def _outcome(error: BaseException | None) -> tuple[str, str | None]:
  """How a launch ended (one of workdir.OUTCOMES) and, when it failed, why."""
  if error is None:
    return 'finished', None
  if isinstance(error, checkpoint.Preempted):
    return 'preempted', None
  if isinstance(error, KeyboardInterrupt):
    return 'interrupted', None
  return 'failed', f'{type(error).__name__}: {error}'


def _better(metric: str | None, mode: str, result: dict, best: dict) -> bool:
  if not metric:
    return False
  return result[metric] > best[metric] if mode == 'max' else result[metric] < best[metric]


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


__all__ = ['train_and_evaluate', 'setup', 'model_facts', 'NonFiniteError']
