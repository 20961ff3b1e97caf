"""Checkpoints with Orbax: WORKDIR/checkpoints/<step>/, asynchronous saves, restore onto any layout.

The TrainState is saved as a plain pytree of arrays (StandardSave): no pickle anywhere, so
restoring executes no code. Restores go to an abstract target (shapes, dtypes, shardings), which
is what lets a checkpoint written under one device count load under another.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saving and restoring one run's TrainState."""

  def __init__(self, workdir: str, *, keep: int = 2, best_metric: str | None = None,
               best_mode: str = 'max', read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    best_fn = (lambda metrics: metrics[best_metric]) if best_metric else None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, best_fn=best_fn, best_mode=best_mode,
        keep_checkpoints_without_metrics=True, create=not read_only, read_only=read_only,
        enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def save(self, step: int, state, metrics: dict | None = None, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=force)

  def restore(self, target, step: int | None = None):
    """The state saved at `step` (default: latest), laid out like `target` (arrays or
    jax.ShapeDtypeStruct with shardings)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_like(tree) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class LoadedRun:
  """A run's `config`, `model` and `variables` (from its latest or best checkpoint), ready for
  `model.apply(run.variables, images, train=False)` on NHWC images normalised like training
  (`run.preprocess(uint8_images)` does that)."""

  def __init__(self, config, model, variables, step: int, mean, std):
    self.config, self.model, self.variables, self.step = config, model, variables, step
    self.mean, self.std = mean, std

  def preprocess(self, images):
    from cnnlab.data import augment
    return augment.normalize(images, self.mean, self.std)

  def predict(self, images):
    """(B, H, W, C) uint8 images -> (B, num_classes) logits."""
    return self.model.apply(self.variables, self.preprocess(images), train=False)


def load_run(workdir: str, step: int | str | None = None) -> LoadedRun:
  """The model of the run in `workdir` at `step`: None = latest checkpoint, 'best' = best by
  `checkpoint.best_metric`, or a step number. Restores plain arrays: no code runs."""
  from cnnlab import config as config_lib, data
  from cnnlab.train.loop import build_model
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir!r} holds no config.json: not a cnnlab run directory')
  with open(path, encoding='utf-8') as f:
    config = config_lib.from_json(f.read())
  info = data.info(config.data.name, data_dir=config.data.data_dir,
                   image_size=config.data.image_size, **data.builder_kwargs(config.data))
  model = build_model(config, config.model.num_classes or info.num_classes)
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    if step == 'best':
      step = ckpt.best_step()
    step = ckpt.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {ckpt.directory}')
    restored = ckpt.manager.restore(step, args=ocp.args.StandardRestore())
  finally:
    ckpt.close()
  params = restored.get('ema_params') or restored['params']
  variables = {'params': params}
  if restored.get('batch_stats'):
    variables['batch_stats'] = restored['batch_stats']
  mean, std = data.augment.normalization(config.data, info)
  return LoadedRun(config, model, variables, step, mean, std)
