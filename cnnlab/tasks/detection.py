"""Object detection: boxes and classes of several objects per image, trained on a two-stage
detector's own sampled targets (Faster R-CNN) and scored by COCO's box AP over the whole split.

Conventions:
  boxes     (ymin, xmin, ymax, xmax) in image fractions, min <= max (cnnlab.ops.boxes), both in
            the data ('boxes' (B, N, 4) with 'labels' (B, N) int32, padding -1, and 'num_objects'
            (B,); cnnlab.data.shapes with max_objects = N) and in the detections.
  classes   K = the dataset's classes; a detection's label is in [0, K). The model's RoI head
            scores K + 1 classes, 0 the background and k + 1 class k.
  outputs   training (`model.apply(..., train=True, targets=..., rngs={'sample': ...})`): a dict
              rpn_logits (B, A), rpn_deltas (B, A, 4), rpn_targets (B, A, 4),
              rpn_labels (B, A) int32: 1 sampled positive, 0 sampled negative, -1 not sampled;
              roi_logits (B, R, K + 1), roi_deltas (B, R, 4) (those of the RoI's target class),
              roi_targets (B, R, 4), roi_labels (B, R) int32: 0 background, k + 1 class k, -1
              not sampled.
            evaluation (train=False): boxes (B, D, 4), scores (B, D), labels (B, D) int32,
              num_detections (B,) int32; sorted by score, the first num_detections real.

The loss is torchvision's (rpn.RegionProposalNetwork.compute_loss, roi_heads.fastrcnn_loss), over
the batch: binary cross-entropy of the sampled anchors' objectness (their mean), smooth L1 (beta
1/9) of the positive anchors' deltas summed over them and the corners / the sampled anchors;
cross-entropy of the sampled RoIs (their mean), smooth L1 (beta 1/9) of the foreground RoIs'
deltas summed / the sampled RoIs. Nothing the model sampled is differentiated through.

A detector in evaluation mode gives detections, not losses (as torchvision's), so the evaluation
has no 'loss': it is COCO's, AP (IoU .50:.95), AP50, AP75 and AR100 (cnnlab.tasks.coco_eval, equal
to pycocotools) over every detection of the split, gathered on the host (`Task.eval_records`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from cnnlab.layers import as_logits
from cnnlab.tasks import figures
from cnnlab.tasks.base import Task, TaskError, check_shape, output_shape
from cnnlab.tasks.classification import cross_entropy
from cnnlab.tasks.coco_eval import CocoEvaluator
from cnnlab.tasks.localization import smooth_l1
from cnnlab.tasks.names import HEADLINES, METRICS

SMOOTH_L1_BETA = 1.0 / 9.0  # torchvision's, on box deltas, in both stages
TRAIN_OUTPUTS = ('rpn_logits', 'rpn_deltas', 'rpn_labels', 'rpn_targets', 'roi_logits',
                 'roi_deltas', 'roi_labels', 'roi_targets')
EVAL_OUTPUTS = ('boxes', 'scores', 'labels', 'num_detections')
# The COCO numbers in metrics.jsonl (all twelve are in summary.json).
COCO_METRICS = ('AP', 'AP50', 'AP75', 'AR100')
SHOWN_SCORE = 0.5  # panels draw the detections scoring at least this


def _ordered(boxes: jax.Array) -> jax.Array:
  """(..., 4) boxes with each pair of corners in order (min, max)."""
  return jnp.concatenate([jnp.minimum(boxes[..., :2], boxes[..., 2:]),
                          jnp.maximum(boxes[..., :2], boxes[..., 2:])], -1)


@dataclasses.dataclass(frozen=True)
class Detection(Task):
  """Faster R-CNN's four losses, summed (train metrics 'rpn_objectness', 'rpn_box', 'roi_class',
  'roi_box'); evaluation by COCO box AP over the split, headline AP50. Panels: each example's
  true boxes and, below, its detections scoring >= SHOWN_SCORE."""
  name = 'detection'
  keys = ('labels', 'boxes', 'num_objects')
  headline, mode = HEADLINES[name]
  metrics = METRICS[name]

  @classmethod
  def check_dataset(cls, config, info):
    if info.max_objects:
      return super().check_dataset(config, info)
    fix = ('set data.shapes.max_objects >= 1 (6 suits 64x64 images)' if info.name == 'shapes'
           else "use a dataset of several objects per image, e.g. data.name='shapes' with "
                'data.shapes.max_objects >= 1')
    have = ', '.join(map(repr, info.example_keys()))
    return [f"task.name='detection' needs several objects per image ('labels', 'boxes', "
            f"'num_objects'); data.name={info.name!r} has one label per image ({have}): {fix}"]

  # -- training ------------------------------------------------------------------------------
  def model_inputs(self, batch, train):
    """Training: {'targets': {'boxes' (B, N, 4) float32, 'labels' (B, N), 'num_objects' (B,)}}
    (the augmented batch's); evaluation: nothing."""
    if not train:
      return {}
    return {'targets': {'boxes': batch['boxes'].astype(jnp.float32), 'labels': batch['labels'],
                        'num_objects': batch['num_objects']}}

  def check_outputs(self, outputs, images) -> None:
    b, k = images.shape[0], self.num_classes
    keys = set(outputs) if isinstance(outputs, dict) else None
    if keys == set(EVAL_OUTPUTS):
      d = outputs['boxes'].shape[1] if outputs['boxes'].ndim == 3 else None
      check_shape('detection boxes', outputs['boxes'].shape, (b, None, 4))
      for key, shape in (('scores', (b, d)), ('labels', (b, d)), ('num_detections', (b,))):
        check_shape(f'detection {key}', outputs[key].shape, shape)
      return
    if keys == set(TRAIN_OUTPUTS):
      a, r = outputs['rpn_logits'].shape[-1], outputs['roi_logits'].shape[1]
      expected = {'rpn_logits': (b, a), 'rpn_deltas': (b, a, 4), 'rpn_labels': (b, a),
                  'rpn_targets': (b, a, 4), 'roi_logits': (b, r, k + 1), 'roi_deltas': (b, r, 4),
                  'roi_labels': (b, r), 'roi_targets': (b, r, 4)}
      for key, shape in expected.items():
        check_shape(f'detection {key} (K = {k} classes + the background)' if key == 'roi_logits'
                    else f'detection {key}', outputs[key].shape, shape)
      return
    raise TaskError(f'detection takes a dict {list(EVAL_OUTPUTS)} in evaluation and '
                    f'{list(TRAIN_OUTPUTS)} in training; the model gives {output_shape(outputs)}')

  def _terms(self, outputs) -> dict[str, jax.Array]:
    """The four losses of a batch of training outputs, each a float32 scalar."""
    out = {key: lax.stop_gradient(outputs[key]) for key in
           ('rpn_labels', 'rpn_targets', 'roi_labels', 'roi_targets')}
    rpn_logits, rpn_deltas = as_logits(outputs['rpn_logits']), as_logits(outputs['rpn_deltas'])
    roi_logits, roi_deltas = as_logits(outputs['roi_logits']), as_logits(outputs['roi_deltas'])
    zero = jnp.zeros((), rpn_logits.dtype)

    def count(x):
      return jnp.maximum(jnp.sum(x.astype(rpn_logits.dtype)), 1.0)

    def box_sum(deltas, targets, chosen):
      diff = deltas - targets.astype(deltas.dtype)
      return jnp.sum(jnp.where(chosen[..., None], smooth_l1(diff, SMOOTH_L1_BETA), zero))

    labels = out['rpn_labels']
    sampled, positive = labels >= 0, labels == 1
    bce = optax.sigmoid_binary_cross_entropy(rpn_logits, positive.astype(rpn_logits.dtype))
    anchors = count(sampled)
    rpn_objectness = jnp.sum(jnp.where(sampled, bce, zero)) / anchors
    rpn_box = box_sum(rpn_deltas, out['rpn_targets'], positive) / anchors
    labels = out['roi_labels']
    sampled, foreground = labels >= 0, labels > 0
    ce = cross_entropy(roi_logits, jnp.maximum(labels, 0), self.num_classes + 1)
    rois = count(sampled)
    roi_class = jnp.sum(jnp.where(sampled, ce, zero)) / rois
    roi_box = box_sum(roi_deltas, out['roi_targets'], foreground) / rois
    return {'rpn_objectness': rpn_objectness, 'rpn_box': rpn_box, 'roi_class': roi_class,
            'roi_box': roi_box}

  def loss(self, outputs, batch):
    terms = self._terms(outputs)
    return sum(terms.values()), terms

  # -- evaluation ----------------------------------------------------------------------------
  def eval_sums(self, outputs, batch, valid):
    return {'count': jnp.sum(valid)}

  def eval_records(self, outputs, batch):
    """Each image's detections (corners put in order) and its true objects."""
    return {'boxes': _ordered(as_logits(outputs['boxes'])),
            'scores': as_logits(outputs['scores']),
            'labels': outputs['labels'].astype(jnp.int32),
            'num_detections': outputs['num_detections'].astype(jnp.int32),
            'gt_boxes': batch['boxes'].astype(jnp.float32),
            'gt_labels': batch['labels'].astype(jnp.int32),
            'num_objects': batch['num_objects'].astype(jnp.int32)}

  def new_accumulator(self, image_shape):
    """A CocoEvaluator of the K classes, for boxes in fractions of (H, W) images."""
    return CocoEvaluator(self.num_classes, image_size=tuple(image_shape[:2]))

  def accumulate(self, accumulator, records):
    if len(records['boxes']):
      accumulator.add(records['boxes'], records['scores'], records['labels'],
                      records['gt_boxes'], records['gt_labels'],
                      num_detections=records['num_detections'],
                      num_objects=records['num_objects'])
    return accumulator

  def finalize(self, sums, accumulator=None):
    """AP, AP50, AP75, AR100; details: COCO's twelve numbers ('coco'; -1 where no class has a
    true object) and the images scored."""
    if accumulator is None:
      raise TaskError('detection is scored from its records: finalize(sums, accumulator)')
    coco = accumulator.summarize()
    return ({key: coco[key] for key in COCO_METRICS},
            {'coco': coco, 'images': int(round(float(sums['count'])))})

  def summary(self, details):
    return {'coco': dict(details['coco'])} if details and 'coco' in details else {}

  # -- prediction ----------------------------------------------------------------------------
  def predict(self, outputs):
    """{'boxes' (B, D, 4) (ymin, xmin, ymax, xmax) in image fractions, 'scores' (B, D),
    'labels' (B, D) int32 in [0, K), 'num_detections' (B,) int32}: best score first, the first
    num_detections of each image real."""
    return {'boxes': as_logits(outputs['boxes']), 'scores': as_logits(outputs['scores']),
            'labels': outputs['labels'].astype(jnp.int32),
            'num_detections': outputs['num_detections'].astype(jnp.int32)}

  def figure(self, images, prediction, truth, path, *, title=None):
    names = self.class_names
    boxes, scores = np.asarray(prediction['boxes']), np.asarray(prediction['scores'])
    labels, counts = np.asarray(prediction['labels']), np.asarray(prediction['num_detections'])
    known = truth is not None and all(k in truth for k in self.keys)
    kinds = (['truth'] if known else []) + [f'prediction\n(score >= {SHOWN_SCORE})']

    def draw(ax, r, row):  # (example, kind)
      ax.imshow(figures.as_rgb(images[r]))
      shape = images[r].shape
      if known and row == 0:
        n = int(truth['num_objects'][r])
        for box, k in zip(truth['boxes'][r][:n], truth['labels'][r][:n]):
          figures.draw_box(ax, box, shape, 'lime', figures.class_name(int(k), names))
        ax.set_xlabel(f'{n} object{"s" * (n != 1)}', fontsize=8)
        return
      shown = [i for i in range(int(counts[r])) if scores[r, i] >= SHOWN_SCORE]
      for i in shown:
        figures.draw_box(ax, boxes[r, i], shape, 'red',
                         f'{figures.class_name(int(labels[r, i]), names)} {scores[r, i]:.2f}')
      ax.set_xlabel(f'{len(shown)} of {int(counts[r])} detections', fontsize=8)
    return figures.grid(path, kinds, len(images), draw, title=title)


__all__ = ['Detection', 'SMOOTH_L1_BETA', 'TRAIN_OUTPUTS', 'EVAL_OUTPUTS', 'COCO_METRICS']
