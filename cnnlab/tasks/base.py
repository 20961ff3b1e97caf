"""What every task gives the trainer: `Task`, and the exact accumulators tasks share.

A task reads a model's output against a batch. The training step, the evaluation loop, checkpoint
ranking, `load_run(...).predict`, `cnnlab predict` and the reports all go through it, so none of
them knows what a label, a mask or a box is.

Evaluation adds up *sums* (a confusion matrix, loss sums, counts), never means of batch means: the
whole split is scored exactly, whatever its batch padding ('valid' False rows count for nothing)
and however many devices share a batch (pmap psums the sums; under jit they are global already).
A metric that is no sum (COCO's AP ranks every detection of the split) comes from *records*:
per-example arrays the evaluation step returns beside the sums (`eval_records`), gathered whole
over devices and hosts, stripped of the padding rows and fed batch by batch, in split order, to an
accumulator on the host (`new_accumulator`, `accumulate`) that `finalize` reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np


class TaskError(ValueError):
  """A model's output or a dataset does not fit the task; the message says what was expected."""


@dataclasses.dataclass(frozen=True)
class Task:
  """A task bound to its settings (read from `config.task` and the dataset once, at set-up).

  Class attributes (what the rest of cnnlab may ask without a config):
    name      the `config.task.name` choosing it.
    keys      batch keys the loss and metrics read besides 'image' (the dataset must have them).
    metrics   the scalar metrics `finalize` gives (cnnlab.tasks.names.METRICS).
    headline  the evaluation metric that sums a run up: what `checkpoint.best_metric` defaults to,
              what `cnnlab runs` shows and `cnnlab report` tables and plots; `mode` 'max' | 'min'.
    mixing    whether mixup/cutmix make sense (they blend labels, not masks or boxes).

  Fields: `num_classes`, the classes the model outputs (None when it outputs pixels), and
  `class_names` when the dataset has them (figures only).
  """
  name: ClassVar[str] = ''
  keys: ClassVar[tuple[str, ...]] = ()
  headline: ClassVar[str] = 'loss'
  mode: ClassVar[str] = 'min'
  metrics: ClassVar[tuple[str, ...]] = ('loss',)
  mixing: ClassVar[bool] = False

  num_classes: int | None = None
  class_names: tuple[str, ...] | None = None

  # Model classes: what `config.model.num_classes` must be for a dataset (None: the model has no
  # classes). The dataset's `info` is a cnnlab.data.DatasetInfo.
  @classmethod
  def model_classes(cls, info) -> int | None:
    return info.num_classes

  @classmethod
  def from_config(cls, task_config, num_classes: int | None, class_names=None) -> 'Task':
    """The task with the options it reads from `config.task` (each task knows its own keys)."""
    return cls(num_classes=num_classes, class_names=class_names)

  @classmethod
  def check_config(cls, task_config, info) -> list[str]:
    """Problems with `config.task`'s options for this task and dataset, each naming its key."""
    return []

  @classmethod
  def check_dataset(cls, config, info) -> list[str]:
    """Problems with the dataset for this task (its examples lack the task's keys), each naming
    the key to change; `check_config` is asked only when there are none."""
    have = info.example_keys()
    missing = [k for k in cls.keys if k not in have]
    if not missing:
      return []
    return [f'task.name={cls.name!r} needs {", ".join(map(repr, missing))} in every example; '
            f'data.name={info.name!r} has {", ".join(map(repr, have))}']

  # -- the training step -------------------------------------------------------------------
  def model_inputs(self, batch: Mapping[str, jax.Array], train: bool) -> dict[str, Any]:
    """Keyword arguments for `model.apply` besides the images (a detector's training targets);
    {} by default. `batch` is the step's own (a device's slice under pmap), augmented."""
    return {}

  def check_outputs(self, outputs, images) -> None:
    """Raises TaskError unless `outputs` (arrays or their shapes, traced) fit the task for these
    (B, H, W, C) images. Called while the step is traced, so a misfit fails before compiling."""

  def loss(self, outputs, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """(scalar loss, {metric: scalar}) of one training batch; the metrics are averaged over the
    steps of a log interval (e.g. 'accuracy')."""
    raise NotImplementedError

  # -- evaluation ----------------------------------------------------------------------------
  def eval_sums(self, outputs, batch: Mapping[str, jax.Array], valid: jax.Array) -> dict:
    """Sums over the batch's valid rows ((B,) float 0/1) that add up to the split's metrics."""
    raise NotImplementedError

  def eval_records(self, outputs, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array] | None:
    """Per-example arrays (leading axis B) the host needs to score the split, or None (the
    default: the sums say everything). The evaluation drops the padding rows itself."""
    return None

  def new_accumulator(self, image_shape: tuple[int, ...]) -> Any:
    """What gathers a split's records on the host, for (H, W, C) images; None for a task
    without `eval_records`."""
    return None

  def accumulate(self, accumulator, records: Mapping[str, np.ndarray]) -> Any:
    """Adds one batch's records (numpy, padding rows removed, in split order); returns the
    accumulator."""
    return accumulator

  def finalize(self, sums: Mapping[str, np.ndarray],
               accumulator: Any = None) -> tuple[dict[str, float], dict[str, Any]]:
    """(scalar metrics for metrics.jsonl, details for summary.json: JSON lists) of a split: from
    its sums and, for a task with `eval_records`, its accumulator (passed only then)."""
    raise NotImplementedError

  def summary(self, details: Mapping[str, Any] | None) -> dict[str, Any]:
    """What summary.json shows of the final evaluation's details (per-class figures)."""
    return dict(details or {})

  # -- prediction ----------------------------------------------------------------------------
  def predict(self, outputs) -> Any:
    """What a user gets back from `load_run(dir).predict(images)`."""
    raise NotImplementedError

  def truth(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ground truth of a batch as `predict` names things (for panels and comparisons)."""
    return {key: np.asarray(batch[key]) for key in self.keys if key in batch}

  def figure(self, images: np.ndarray, prediction, truth: Mapping[str, np.ndarray] | None,
             path: str, *, title: str | None = None) -> str:
    """A PNG panel of a few examples (input, truth where known, prediction); returns `path`."""
    raise NotImplementedError


def confusion(true: jax.Array, predicted: jax.Array, weight: jax.Array, k: int) -> jax.Array:
  """(k, k) int32 counts, rows the true class and columns the predicted one, of integer arrays of
  one shape, each element counted `weight` (0 or 1) times; true values outside [0, k) count for
  nothing (an ignored pixel)."""
  inside = (true >= 0) & (true < k)
  weight = jnp.where(inside, weight, 0).astype(jnp.int32)
  return jnp.zeros((k, k), jnp.int32).at[jnp.clip(true, 0, k - 1).ravel(),
                                        predicted.ravel()].add(weight.ravel())


def per_class_rate(numerator: np.ndarray, denominator: np.ndarray) -> list[float | None]:
  """numerator / denominator per class, None where the denominator is 0 (the class is absent)."""
  return [None if d == 0 else float(n / d) for n, d in zip(numerator, denominator)]


def check_shape(what: str, actual, expected: tuple) -> None:
  """Raises TaskError unless `actual` (a shape) equals `expected`, where None matches any size."""
  actual = tuple(actual)
  fits = len(actual) == len(expected) and all(e is None or a == e for a, e in zip(actual, expected))
  if not fits:
    shown = tuple('?' if e is None else e for e in expected)
    raise TaskError(f'{what}: expected shape {shown}, the model gives {actual}')


def output_shape(outputs) -> Any:
  """A model output's shape(s) as a readable value: a tuple, or a dict of tuples."""
  if isinstance(outputs, Mapping):
    return {k: tuple(v.shape) for k, v in outputs.items()}
  return tuple(getattr(outputs, 'shape', ()))


__all__ = ['Task', 'TaskError', 'confusion', 'per_class_rate', 'check_shape', 'output_shape']
