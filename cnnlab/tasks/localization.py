"""Classification + localisation: a label and one box per image. Model output: a dict
{'logits': (B, K), 'box': (B, 4)}, the box (ymin, xmin, ymax, xmax) in image fractions."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cnnlab import ops
from cnnlab.layers import as_logits
from cnnlab.tasks import figures
from cnnlab.tasks.base import Task, TaskError, check_shape, confusion, output_shape
from cnnlab.tasks.classification import CONFUSION_MAX_CLASSES, confusion_summary, cross_entropy
from cnnlab.tasks.names import HEADLINES, METRICS

BOX_LOSSES = ('smooth_l1', 'giou')


def smooth_l1(x: jax.Array, beta: float) -> jax.Array:
  """Huber-like: 0.5 x^2 / beta inside |x| < beta, |x| - 0.5 beta outside (PyTorch's)."""
  ax = jnp.abs(x)
  return jnp.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


@dataclasses.dataclass(frozen=True)
class Localization(Task):
  """Loss: cross-entropy + `task.box_weight` x box loss ('smooth_l1' summed over the four
  corners, in image fractions, or 'giou': 1 - GIoU). Metrics: 'accuracy', 'box_iou' (the mean IoU
  of the predicted box with the true one) and 'localized', the fraction of images with the right
  class and IoU >= `task.iou_threshold` (the headline)."""
  name = 'localization'
  keys = ('label', 'bbox')
  headline, mode = HEADLINES[name]
  metrics = METRICS[name]

  box_loss: str = 'smooth_l1'
  box_weight: float = 1.0
  smooth_l1_beta: float = 1.0 / 9.0
  iou_threshold: float = 0.5

  @classmethod
  def from_config(cls, config, num_classes, class_names=None):
    t = config.task
    return cls(num_classes=num_classes, class_names=class_names, box_loss=t.box_loss,
               box_weight=float(t.box_weight), smooth_l1_beta=float(t.smooth_l1_beta),
               iou_threshold=float(t.iou_threshold))

  @classmethod
  def check_config(cls, task_config, info):
    problems = []
    if task_config.box_loss not in BOX_LOSSES:
      problems.append(f'task.box_loss={task_config.box_loss!r}: expected one of {BOX_LOSSES}')
    if task_config.box_weight < 0:
      problems.append(f'task.box_weight={task_config.box_weight!r}: expected >= 0')
    if not task_config.smooth_l1_beta > 0:
      problems.append(f'task.smooth_l1_beta={task_config.smooth_l1_beta!r}: expected > 0')
    if not 0 < task_config.iou_threshold <= 1:
      problems.append(f'task.iou_threshold={task_config.iou_threshold!r}: expected in (0, 1]')
    return problems

  def check_outputs(self, outputs, images) -> None:
    b = images.shape[0]
    expected = f"{{'logits': ({b}, {self.num_classes}), 'box': ({b}, 4)}}"
    if not isinstance(outputs, dict) or set(outputs) != {'logits', 'box'}:
      raise TaskError(f'localization takes a dict {expected}; the model gives '
                      f'{output_shape(outputs)}')
    check_shape('localization logits', outputs['logits'].shape, (b, self.num_classes))
    check_shape('localization box', outputs['box'].shape, (b, 4))

  def _terms(self, outputs, batch):
    """(per-example cross-entropy, box loss, IoU, correct), each (B,)."""
    logits, box = outputs['logits'], as_logits(outputs['box'])
    labels, truth = batch['label'], batch['bbox'].astype(box.dtype)
    ce = cross_entropy(logits, labels, self.num_classes)
    iou = ops.paired_iou(box, truth)
    if self.box_loss == 'giou':
      box_loss = 1.0 - ops.paired_giou(box, truth)
    else:
      box_loss = jnp.sum(smooth_l1(box - truth, self.smooth_l1_beta), axis=-1)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return ce, box_loss, iou, correct

  def loss(self, outputs, batch):
    ce, box_loss, iou, correct = self._terms(outputs, batch)
    loss = jnp.mean(ce + self.box_weight * box_loss)
    return loss, {'accuracy': jnp.mean(correct), 'box_iou': jnp.mean(iou)}

  def eval_sums(self, outputs, batch, valid):
    ce, box_loss, iou, correct = self._terms(outputs, batch)
    found = correct * (iou >= self.iou_threshold).astype(jnp.float32)
    sums = {'loss': jnp.sum((ce + self.box_weight * box_loss) * valid),
            'correct': jnp.sum(correct * valid), 'iou': jnp.sum(iou * valid),
            'localized': jnp.sum(found * valid), 'count': jnp.sum(valid)}
    if self.num_classes <= CONFUSION_MAX_CLASSES:
      sums['confusion'] = confusion(batch['label'], jnp.argmax(outputs['logits'], -1), valid,
                                    self.num_classes)
    return sums

  def finalize(self, sums):
    count = float(sums['count'])
    scalars = {key: float(sums[key]) / count for key in ('loss', 'localized')}
    scalars.update(accuracy=float(sums['correct']) / count, box_iou=float(sums['iou']) / count)
    details = {'confusion': np.asarray(sums['confusion']).tolist()} if 'confusion' in sums else {}
    return scalars, details

  def summary(self, details):
    return confusion_summary(details)

  def predict(self, outputs):
    """{'label': (B,) int32, 'probabilities': (B, K), 'box': (B, 4) (ymin, xmin, ymax, xmax)}."""
    return {'label': jnp.argmax(outputs['logits'], -1).astype(jnp.int32),
            'probabilities': jax.nn.softmax(as_logits(outputs['logits']), -1),
            'box': as_logits(outputs['box'])}

  def figure(self, images, prediction, truth, path, *, title=None):
    names = self.class_names
    labels, boxes = np.asarray(prediction['label']), np.asarray(prediction['box'])
    probabilities = np.asarray(prediction['probabilities'])

    def draw(ax, r, c):  # (example, kind)
      ax.imshow(figures.as_rgb(images[r]))
      shape = images[r].shape
      k = int(labels[r])
      if truth is not None and 'bbox' in truth:
        figures.draw_box(ax, truth['bbox'][r], shape, 'lime')
      figures.draw_box(ax, boxes[r], shape, 'red',
                       f'{figures.class_name(k, names)} {probabilities[r, k]:.2f}')
      if truth is not None and 'label' in truth:
        iou = float(ops.paired_iou(jnp.asarray(boxes[r]), jnp.asarray(truth['bbox'][r])))
        ax.set_xlabel(f'true {figures.class_name(int(truth["label"][r]), names)}, IoU {iou:.2f}',
                      fontsize=8)
    return figures.grid(path, ['green: truth\nred: prediction'], len(images), draw, title=title)


__all__ = ['Localization', 'BOX_LOSSES', 'smooth_l1']
