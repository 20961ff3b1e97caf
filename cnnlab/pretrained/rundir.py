"""Converted weights as a cnnlab run directory, which `cnnlab.inference.load_run` reads like a
trained run: config.json, model.json and an Orbax checkpoint at step 0."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from cnnlab import analysis, config as config_lib, tasks, workdir as workdir_lib
from cnnlab.configs import base
from cnnlab.pretrained.convert import model_for
from cnnlab.train.checkpoint import Checkpointer
from cnnlab.train.state import TrainState

# The normalisation torchvision's ImageNet models take: (x / 255 - mean) / std per RGB channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def converted_config(arch: str, num_classes: int, *, model_args: Mapping[str, Any] | None = None,
                     image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD, dataset: str = 'imagenet2012'):
  """A full cnnlab config (base.get_config()) for torchvision's `arch`: the model and its
  arguments, and data fields giving the input torchvision's model expects (`image_size` square
  RGB images, normalised by the fixed `mean`/`std`). Fine-tuning experiments can start from it."""
  config = base.get_config()
  config.model.name = arch
  config.model.num_classes = num_classes
  for key, value in (model_args or {}).items():
    config.model[key] = value
  config.data.name = dataset
  config.data.image_size = image_size
  config.data.eval_split = 'validation'
  config.data.normalize = 'fixed'
  config.data.mean, config.data.std = tuple(map(float, mean)), tuple(map(float, std))
  return config


def save_converted(arch: str, variables: Mapping[str, Any], out_dir: str, *,
                   model_args: Mapping[str, Any] | None = None, image_size: int = 224,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   class_names: Sequence[str] | None = None) -> str:
  """Writes `variables` of cnnlab's `arch` (from `from_torchvision`) as a run directory `out_dir`
  that `cnnlab.inference.load_run(out_dir).predict(uint8 images)` uses as torchvision would.

  model_args: the model's arguments besides num_classes (read from the classifier) and
    GoogLeNet's aux_logits (read from the variables), e.g. {'transform_input': True} for
    torchvision's ImageNet GoogLeNet; they go into config.json's `model` section.
  image_size, mean, std: the input the run declares: (image_size, image_size, 3) images,
    normalised (x / 255 - mean) / std (torchvision's ImageNet normalisation by default).
  class_names: one name per class, recorded in model.json (optional).
  The checkpoint is step 0 of a TrainState written by cnnlab's own Checkpointer, with no
  optimizer state. `out_dir` must be new or empty. Returns `out_dir`.
  """
  model, _ = model_for(arch, variables, **(model_args or {}))
  num_classes = model.num_classes
  inferred = {'aux_logits': model.aux_logits} if arch == 'googlenet' else {}
  model_args = {**inferred, **(model_args or {})}
  if class_names is not None and len(class_names) != num_classes:
    raise ValueError(f'class_names has {len(class_names)} names; {arch} has {num_classes} classes')
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise ValueError(f'{out_dir!r} exists and is not an empty directory; converted weights go '
                     'into a new run directory')
  os.makedirs(out_dir, exist_ok=True)
  config = converted_config(arch, num_classes, model_args=model_args, image_size=image_size,
                            mean=mean, std=std)
  image_shape = (image_size, image_size, 3)
  metric, mode = tasks.headline(config)
  facts = {'model': arch, 'image_shape': list(image_shape), 'task': config.task.name,
           'headline': {'metric': metric, 'mode': mode}, 'num_classes': num_classes,
           'class_names': None if class_names is None else list(class_names),
           'mean': list(config.data.mean), 'std': list(config.data.std),
           'source': f'torchvision {arch} weights (cnnlab.pretrained)'}
  summary = analysis.summarize(model, image_shape)
  rf = summary.receptive_field
  facts.update(num_params=summary.total_params, macs=summary.total_macs,
               receptive_field=None if rf is None else list(rf))

  params = jax.tree.map(jnp.asarray, dict(variables['params']))
  state = TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=jax.tree.map(jnp.asarray, dict(variables.get('batch_stats', {}))),
      opt_state=optax.EmptyState(), rng=jax.random.PRNGKey(0), ema_params=None,
      loss_scale=jnp.ones((), jnp.float32), good_steps=jnp.zeros((), jnp.int32),
      skips=jnp.zeros((), jnp.int32))
  ckpt = Checkpointer(out_dir, keep=1)
  try:
    ckpt.save(0, state, loop={})
  finally:
    ckpt.close()
  # config.json last: a directory is a run once it names its model (load_run looks for it first).
  workdir_lib.write_json(workdir_lib.safe_join(out_dir, workdir_lib.MODEL), facts)
  workdir_lib.atomic_write(workdir_lib.safe_join(out_dir, workdir_lib.CONFIG),
                           config_lib.to_json(config))
  return out_dir
