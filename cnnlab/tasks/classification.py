"""Classification: a label per image. Model output: (B, K) logits."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnlab.layers import as_logits
from cnnlab.tasks import figures
from cnnlab.tasks.base import Task, TaskError, check_shape, confusion, output_shape, per_class_rate
from cnnlab.tasks.names import HEADLINES, METRICS

# The evaluation counts a confusion matrix (true class x predicted class) for up to this many
# classes; beyond, the matrix is too large to be read or kept in summary.json.
CONFUSION_MAX_CLASSES = 100


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  smoothing: float = 0.0) -> jax.Array:
  """Softmax cross-entropy of (..., K) logits against integer labels (...), with label smoothing;
  in float32 at least (float64 stays float64)."""
  logits = as_logits(logits)
  targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
  if smoothing:
    targets = optax.smooth_labels(targets, smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def confusion_summary(details) -> dict:
  """summary.json's per-class accuracy and confusion matrix (rows: true class, columns:
  predicted) from an evaluation's details; {} when the matrix was not counted."""
  matrix = (details or {}).get('confusion')
  if matrix is None:
    return {}
  matrix = np.asarray(matrix)
  return {'per_class_accuracy': per_class_rate(np.diag(matrix), matrix.sum(axis=1)),
          'confusion_matrix': matrix.tolist()}


@dataclasses.dataclass(frozen=True)
class Classification(Task):
  """Softmax cross-entropy (label smoothing `train.label_smoothing`; mixup/cutmix partners
  weighted); train metric 'accuracy'; evaluation loss (unsmoothed), accuracy and the confusion
  matrix (up to CONFUSION_MAX_CLASSES classes) of the whole split."""
  name = 'classification'
  keys = ('label',)
  headline, mode = HEADLINES[name]
  metrics = METRICS[name]
  mixing = True

  label_smoothing: float = 0.0

  @classmethod
  def from_config(cls, config, num_classes, class_names=None):
    return cls(num_classes=num_classes, class_names=class_names,
               label_smoothing=config.train.label_smoothing)

  def check_outputs(self, outputs, images) -> None:
    if isinstance(outputs, dict):
      raise TaskError(f'classification takes (batch, {self.num_classes}) logits; the model gives '
                      f'a dict {output_shape(outputs)}')
    check_shape('classification logits', outputs.shape, (images.shape[0], self.num_classes))

  def per_example_loss(self, logits, batch) -> jax.Array:
    """(B,) loss; mixed batches (mixup/cutmix) weigh the example's and its partner's labels."""
    ce = lambda labels: cross_entropy(logits, labels, self.num_classes, self.label_smoothing)  # noqa: E731
    if 'label_mix' in batch:
      w = batch['mix_weight']
      return w * ce(batch['label']) + (1.0 - w) * ce(batch['label_mix'])
    return ce(batch['label'])

  def loss(self, outputs, batch):
    correct = (jnp.argmax(outputs, -1) == batch['label']).astype(jnp.float32)
    return jnp.mean(self.per_example_loss(outputs, batch)), {'accuracy': jnp.mean(correct)}

  def eval_sums(self, outputs, batch, valid):
    labels = batch['label']
    predicted = jnp.argmax(outputs, -1)
    sums = {'loss': jnp.sum(cross_entropy(outputs, labels, self.num_classes) * valid),
            'correct': jnp.sum((predicted == labels).astype(jnp.float32) * valid),
            'count': jnp.sum(valid)}
    if self.num_classes <= CONFUSION_MAX_CLASSES:
      sums['confusion'] = confusion(labels, predicted, valid, self.num_classes)
    return sums

  def finalize(self, sums):
    count = float(sums['count'])
    scalars = {'loss': float(sums['loss']) / count, 'accuracy': float(sums['correct']) / count}
    details = {}
    if 'confusion' in sums:
      details['confusion'] = np.asarray(sums['confusion']).tolist()
    return scalars, details

  def summary(self, details):
    return confusion_summary(details)

  def predict(self, outputs):
    """(B, K) logits (the class is their argmax, softmax gives probabilities)."""
    return outputs

  def figure(self, images, prediction, truth, path, *, title=None):
    logits = np.asarray(prediction, np.float64)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    names = self.class_names

    def draw(ax, i, _):
      ax.imshow(figures.as_rgb(images[i]))
      k = int(np.argmax(probabilities[i]))
      text = f'pred {figures.class_name(k, names)} ({probabilities[i, k]:.2f})'
      if truth is not None and 'label' in truth:
        true = int(truth['label'][i])
        text = f'true {figures.class_name(true, names)}\n{text}'
        ax.set_xlabel(text, fontsize=8, color='green' if true == k else 'red')
      else:
        ax.set_xlabel(text, fontsize=8)
    return figures.grid(path, [''], len(images), draw, title=title)


__all__ = ['Classification', 'cross_entropy', 'confusion_summary',
           'CONFUSION_MAX_CLASSES']
