"""A trained run, loaded for use: `load_run(workdir)` -> LoadedRun with `predict(images)`, which
returns what the run's task predicts (cnnlab.tasks).

Nothing here trains, and the training loop does not need this module. A run directory loads on
its own: its config.json names the model, model.json (written when the run starts) holds what
prediction needs (input shape, classes, the input normalisation), and the checkpoint holds the
arrays. No dataset is read, and no code runs while loading (no pickle anywhere).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import numpy as np

from cnnlab import config as config_lib, models, tasks, workdir as workdir_lib
from cnnlab.train.checkpoint import Checkpointer


class LoadedRun:
  """A run's `config`, `model` and `variables` (from its latest or best checkpoint), ready for
  `model.apply(run.variables, images, train=False)` on NHWC images normalised like training
  (`run.preprocess(images)` does that), or simply `run.predict(images)`.

  Attributes: config, model, variables, step (of the checkpoint), task (a cnnlab.tasks.Task),
  image_shape (H, W, C the run trained on), num_classes (the model's; None for a model of
  pixels), mean and std (per channel, 0..1 scale).
  """

  def __init__(self, config, model, variables, step: int, *, image_shape,
               num_classes: int | None, mean, std, task: tasks.Task | None = None):
    self.config, self.model, self.variables, self.step = config, model, variables, step
    self.image_shape, self.num_classes = tuple(image_shape), num_classes
    self.mean, self.std = tuple(mean), tuple(std)
    self.task = task or tasks.create(config, num_classes)
    # One compiled program per batch shape (run op by op, a detector's NMS loops take minutes).
    self._apply = jax.jit(functools.partial(self.model.apply, train=False))

  def preprocess(self, images, value_range: tuple[float, float] | None = None) -> jax.Array:
    """(B, H, W, C) images -> the model's float32 input, normalised as in training.

    uint8 images are read as 0..255. Floating-point images need their range said, because 0..1
    and 0..255 look alike to a model and give wrong answers without an error: `value_range=(0,
    1)` or `(0, 255)` (any (low, high)). Other dtypes, and values outside the stated range, are
    refused naming what was given.
    """
    from cnnlab.data import augment
    images = np.asarray(images) if not isinstance(images, jax.Array) else images
    dtype = np.dtype(images.dtype)
    if images.ndim != 4:
      raise ValueError(f'predict takes (B, H, W, C) images, got shape {tuple(images.shape)}')
    if tuple(images.shape[1:]) != self.image_shape:
      h, w, c = self.image_shape
      raise ValueError(f'images of shape {tuple(images.shape)}: this run was trained on {h}x{w} '
                       f'images with {c} channel{"s" if c > 1 else ""}, (B, {h}, {w}, {c})')
    if dtype == np.uint8:
      if value_range not in (None, (0, 255)):
        raise ValueError(f'uint8 images are 0..255; value_range={value_range!r} does not apply')
      return augment.normalize(images, self.mean, self.std)
    if not np.issubdtype(dtype, np.floating):
      raise ValueError(f'predict takes uint8 images (0..255) or floating-point images with '
                       f'value_range=(low, high); got {dtype} images')
    low_seen, high_seen = float(np.min(images)), float(np.max(images))
    if value_range is None:
      raise ValueError(
          f'{dtype} images (values {low_seen:.3g}..{high_seen:.3g}): say their range, e.g. '
          'predict(images, value_range=(0, 1)) or value_range=(0, 255); or pass uint8 images')
    low, high = map(float, value_range)
    if not high > low:
      raise ValueError(f'value_range={value_range!r}: expected (low, high) with low < high')
    slack = 1e-3 * (high - low)
    if low_seen < low - slack or high_seen > high + slack:
      raise ValueError(f'{dtype} images have values {low_seen:.3g}..{high_seen:.3g}, outside '
                       f'value_range={value_range!r}')
    scaled = (np.asarray(images, np.float32) - low) * (255.0 / (high - low))
    return augment.normalize(scaled, self.mean, self.std)

  def outputs(self, images, value_range: tuple[float, float] | None = None):
    """The model's raw output on (B, H, W, C) images (as `preprocess` takes them), compiled."""
    return self._apply(self.variables, self.preprocess(images, value_range))

  def predict(self, images, value_range: tuple[float, float] | None = None):
    """What the run's task predicts for (B, H, W, C) images (as `preprocess` takes them):
    classification (B, num_classes) logits; segmentation {'mask' (B, H, W), 'probabilities'
    (B, H, W, K)}; localization {'label' (B,), 'probabilities' (B, K), 'box' (B, 4) (ymin, xmin,
    ymax, xmax) in image fractions}; reconstruction {'reconstruction' (B, H, W, C) in 0..1};
    detection {'boxes' (B, D, 4) (ymin, xmin, ymax, xmax) in image fractions, 'scores' (B, D),
    'labels' (B, D), 'num_detections' (B,)}: best first, the first num_detections real."""
    return self.task.predict(self.outputs(images, value_range))


def load_run(workdir: str, step: int | str | None = None) -> LoadedRun:
  """The model of the run in `workdir` at `step`: None = latest checkpoint, 'best' = best by
  `checkpoint.best_metric`, or a step number. Restores plain arrays: no code runs.

  A model registered in a user's module (`config.model.imports`) is imported from the current
  directory or, failing that, from the directory of the experiment file the run was launched with.
  """
  path = workdir_lib.safe_join(workdir, workdir_lib.CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir!r} holds no {workdir_lib.CONFIG}: not a cnnlab run directory')
  with open(path, encoding='utf-8') as f:
    config = config_lib.from_json(f.read())
  facts = run_facts(workdir, config)
  _importable(workdir)
  model = models.from_config(config, facts['num_classes'])
  best_metric, best_mode = tasks.headline(config)
  ckpt = Checkpointer(workdir, best_metric=best_metric, best_mode=best_mode, read_only=True)
  try:
    if step == 'best':
      step = ckpt.best_step()
      if step is None:
        raise FileNotFoundError(f'no checkpoint in {ckpt.directory} carries an evaluation of '
                                f'{best_metric!r}')
    step = ckpt.latest_step() if step is None else int(step)
    restored = ckpt.restore_arrays(step)
  finally:
    ckpt.close()
  params = restored.get('ema_params') or restored['params']
  variables = {'params': params}
  if restored.get('batch_stats'):
    variables['batch_stats'] = restored['batch_stats']
  class_names = facts.get('class_names')
  return LoadedRun(config, model, variables, step, image_shape=facts['image_shape'],
                   num_classes=facts['num_classes'], mean=facts['mean'], std=facts['std'],
                   task=tasks.create(config, facts['num_classes'],
                                     None if class_names is None else tuple(class_names)))


def run_facts(workdir: str, config) -> dict[str, Any]:
  """What a run's model takes and gives (model.json); for a run directory written before
  model.json existed, derived from the dataset as that run's training did."""
  facts = workdir_lib.read_json(os.path.join(workdir, workdir_lib.MODEL))
  if facts is not None:
    return facts
  from cnnlab import data
  info = data.info(config.data.name, data_dir=config.data.data_dir,
                   image_size=config.data.image_size, **data.builder_kwargs(config.data))
  mean, std = data.augment.normalization(config.data, info)
  return {'image_shape': list(info.image_shape),
          'num_classes': config.model.num_classes or info.num_classes, 'mean': mean, 'std': std,
          'class_names': info.class_names}


def _importable(workdir: str) -> None:
  """Puts the launching experiment's directory on sys.path, after the current directory, so a
  user's model module beside the experiment file imports when loading from elsewhere."""
  import sys
  launches = (workdir_lib.read_json(os.path.join(workdir, workdir_lib.PROVENANCE)) or {}).get(
      'launches', [])
  for launch in reversed(launches):
    config_file = launch.get('config_file')
    if config_file:
      directory = os.path.dirname(os.path.abspath(config_file))
      if directory not in sys.path:
        sys.path.append(directory)
      return


__all__ = ['LoadedRun', 'load_run', 'run_facts']
