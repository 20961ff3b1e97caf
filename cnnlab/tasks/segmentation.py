"""Semantic segmentation: a class per pixel. Model output: (B, H, W, K) logits at the input's
resolution, K = the dataset's classes + 1 (mask value 0 is the background, k + 1 is class k)."""

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


@dataclasses.dataclass(frozen=True)
class Segmentation(Task):
  """Per-pixel softmax cross-entropy, weighted by `task.class_weights` (the weighted mean over
  pixels, as PyTorch's CrossEntropyLoss) with `task.ignore_value` pixels left out; train metric
  'pixel_accuracy'. Evaluation: from the (K, K) pixel confusion matrix of the whole split, pixel
  accuracy, IoU per class (TP / (TP + FP + FN)) and their mean 'miou' over the classes present in
  the truth or the prediction (an absent class has no IoU)."""
  name = 'segmentation'
  keys = ('mask',)
  headline, mode = HEADLINES[name]
  metrics = METRICS[name]

  class_weights: tuple[float, ...] = ()
  ignore_value: int = -1

  @classmethod
  def model_classes(cls, info):
    return info.num_mask_classes

  @classmethod
  def from_config(cls, config, num_classes, class_names=None):
    return cls(num_classes=num_classes, class_names=class_names,
               class_weights=tuple(float(w) for w in config.task.class_weights),
               ignore_value=int(config.task.ignore_value))

  @classmethod
  def check_config(cls, task_config, info):
    weights = tuple(task_config.class_weights)
    if weights and len(weights) != info.num_mask_classes:
      return [f'task.class_weights has {len(weights)} values; {info.name} masks have '
              f'{info.num_mask_classes} classes (background first)']
    if any(w < 0 for w in weights):
      return [f'task.class_weights={weights}: expected weights >= 0']
    return []

  def check_outputs(self, outputs, images) -> None:
    b, h, w = images.shape[:3]
    if isinstance(outputs, dict):
      raise TaskError(f'segmentation takes (batch, {h}, {w}, {self.num_classes}) per-pixel logits; '
                      f'the model gives a dict {output_shape(outputs)}')
    check_shape(f'segmentation per-pixel logits (background + {self.num_classes - 1} classes)',
                outputs.shape, (b, h, w, self.num_classes))

  def _pixels(self, outputs, mask):
    """(per-pixel cross-entropy, class index, 0/1 weight of pixels not ignored), each (B, H, W)."""
    mask = mask.astype(jnp.int32)
    keep = (mask != self.ignore_value) & (mask < self.num_classes)
    target = jnp.where(keep, mask, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(as_logits(outputs), target)
    return ce, target, keep.astype(jnp.float32)

  def _weights(self, target, keep):
    if not self.class_weights:
      return keep
    return keep * jnp.asarray(self.class_weights, jnp.float32)[target]

  def loss(self, outputs, batch):
    ce, target, keep = self._pixels(outputs, batch['mask'])
    weight = self._weights(target, keep)
    loss = jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1e-12)
    correct = (jnp.argmax(outputs, -1) == target).astype(jnp.float32) * keep
    return loss, {'pixel_accuracy': jnp.sum(correct) / jnp.maximum(jnp.sum(keep), 1.0)}

  def eval_sums(self, outputs, batch, valid):
    ce, target, keep = self._pixels(outputs, batch['mask'])
    keep = keep * valid[:, None, None]
    weight = self._weights(target, keep)
    return {'loss': jnp.sum(ce * weight), 'loss_weight': jnp.sum(weight),
            'confusion': confusion(target, jnp.argmax(outputs, -1), keep, self.num_classes)}

  def finalize(self, sums):
    matrix = np.asarray(sums['confusion'], np.int64)
    true, predicted, hits = matrix.sum(1), matrix.sum(0), np.diag(matrix)
    iou = per_class_rate(hits, true + predicted - hits)
    present = [v for v in iou if v is not None]
    scalars = {'loss': float(sums['loss']) / max(float(sums['loss_weight']), 1e-12),
               'pixel_accuracy': float(hits.sum() / max(matrix.sum(), 1)),
               'miou': float(np.mean(present)) if present else 0.0}
    return scalars, {'confusion': matrix.tolist(), 'iou': iou}

  def summary(self, details):
    """IoU and pixel accuracy (recall) per class and the pixel confusion matrix."""
    if not details:
      return {}
    matrix = np.asarray(details['confusion'])
    return {'per_class_iou': details['iou'],
            'per_class_pixel_accuracy': per_class_rate(np.diag(matrix), matrix.sum(1)),
            'confusion_matrix': matrix.tolist()}

  def predict(self, outputs):
    """{'mask': (B, H, W) int32 classes, 'probabilities': (B, H, W, K) softmax}."""
    return {'mask': jnp.argmax(outputs, -1).astype(jnp.int32),
            'probabilities': jax.nn.softmax(as_logits(outputs), -1)}

  def figure(self, images, prediction, truth, path, *, title=None):
    names = ('background', *self.class_names) if self.class_names else None
    columns = ['image', *(['truth'] if truth is not None and 'mask' in truth else []), 'prediction']
    predicted = np.asarray(prediction['mask'])

    def draw(ax, r, c):  # (example, kind)
      column = columns[c]
      if column == 'image':
        ax.imshow(figures.as_rgb(images[r]))
        return
      mask = predicted[r] if column == 'prediction' else np.asarray(truth['mask'][r], np.int64)
      ax.imshow(figures.overlay(images[r], np.where(mask < self.num_classes, mask, 0),
                                self.num_classes))
      present = [figures.class_name(int(k), names) for k in np.unique(mask)
                 if 0 < k < self.num_classes]
      ax.set_xlabel(', '.join(present), fontsize=7)
    return figures.grid(path, columns, len(images), draw, title=title)


__all__ = ['Segmentation']
