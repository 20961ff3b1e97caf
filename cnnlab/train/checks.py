"""Set-up checks: what a config and a model must satisfy before anything compiles or is written.
A run's `setup` calls them; tests and tools can call them on a config alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cnnlab import config as config_lib, tasks
from cnnlab.train import optim, transfer


def check_parameter_keys(config, model, image_shape) -> dict | None:
  """Checks the keys that name the model's variables by path pattern (optim.freeze,
  optim.lr_multipliers, transfer.init_exclude) and the transfer section: ConfigError listing
  every problem. Returns the variables' {'params': {path: shape}, 'batch_stats': ...} (abstract)
  when a pattern needed them, else None."""
  problems = [*optim.check_config(config.optim), *transfer.check_config(config.transfer)]
  variables = None
  if config.optim.freeze or config.optim.lr_multipliers or config.transfer.init_exclude:
    variables = transfer.variable_shapes(model, image_shape)
    problems += [*optim.check_patterns(config.optim, variables),
                 *transfer.check_patterns(config.transfer, variables)]
  if problems:
    raise config_lib.ConfigError('invalid config:\n  ' + '\n  '.join(problems))
  return variables


def check_outputs(model, task: tasks.Task, image_shape) -> None:
  """Raises TaskError (naming the expected and the actual shape) unless the model's output fits
  the task: abstractly, before anything compiles or is written."""
  images = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)

  def outputs(x):
    key = jax.random.key(0)
    return model.init_with_output({'params': key, 'dropout': key}, x, train=False)[0]
  task.check_outputs(jax.eval_shape(outputs, images), images)


__all__ = ['check_outputs', 'check_parameter_keys']
