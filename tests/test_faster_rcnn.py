"""faster_rcnn and its target assignment (cnnlab.models.faster_rcnn, .detection_targets): the
training and detection outputs' contract, the sampling's quotas, an image without objects, the
gradient, and the pieces torchvision has (Matcher and the RPN's anchor labels, the RPN's proposal
filter, RoIHeads.postprocess_detections) against torchvision itself.

Fast by design: one tiny model (conv_stack of 4, 8, 8 filters: an 8 x 8 map at stride 8 on 64 x 64
images, 576 anchors) whose init, training outputs, gradient and detections are one program,
compiled once for the module; the torchvision comparisons run the pieces as plain functions.
Boxes are ours (ymin, xmin, ymax, xmax); `xy` converts to torchvision's (x1, y1, x2, y2).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab import models, ops
from cnnlab.models import detection_targets as dt
from cnnlab.models.faster_rcnn import postprocess, propose

torch = pytest.importorskip('torch')
tv_ops = pytest.importorskip('torchvision.ops')
tv_utils = pytest.importorskip('torchvision.models.detection._utils')
tv_rpn = pytest.importorskip('torchvision.models.detection.rpn')
tv_roi_heads = pytest.importorskip('torchvision.models.detection.roi_heads')

SMALL = dict(backbone_args={'filters': (4, 8, 8)}, representation_size=16,
             rpn_post_nms_top_n_train=32, rpn_post_nms_top_n_test=16, box_batch_size_per_image=16,
             box_positive_fraction=0.5, detections_per_image=8)
# Image 0 has three objects (fractions), image 1 none; N = 4 with padding.
BOXES = np.array([[[0.10, 0.10, 0.30, 0.35], [0.50, 0.55, 0.80, 0.75], [0.2, 0.6, 0.45, 0.9],
                   [0, 0, 0, 0]], [[0, 0, 0, 0]] * 4], np.float32)
TARGETS = {'boxes': BOXES, 'labels': np.array([[1, 3, 0, -1], [-1] * 4], np.int32),
           'num_objects': np.array([3, 0], np.int32)}


def xy(boxes):
  """Ours (..., 4) yxyx -> torchvision's xyxy, as a torch tensor."""
  return torch.tensor(np.asarray(boxes)[..., [1, 0, 3, 2]])


def yx(tensor):
  """torchvision's xyxy tensor -> our yxyx array."""
  return tensor.detach().numpy()[..., [1, 0, 3, 2]]


def loss_of(out):
  """torchvision's four Faster R-CNN losses from the training outputs (the task's pairing)."""
  def smooth_l1(d):
    a = jnp.abs(d)
    return jnp.where(a < 1 / 9, 4.5 * a ** 2, a - 0.5 / 9)
  total = jnp.zeros((), jnp.float32)
  for stage in ('rpn', 'roi'):
    labels = out[f'{stage}_labels']
    sampled = labels >= 0
    count = jnp.maximum(jnp.sum(sampled), 1).astype(jnp.float32)
    if stage == 'rpn':
      x, z = out['rpn_logits'], (labels == 1).astype(jnp.float32)
      cls = jnp.maximum(x, 0) - x * z + jnp.log1p(jnp.exp(-jnp.abs(x)))
    else:
      logp = jax.nn.log_softmax(out['roi_logits'])
      cls = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], -1)[..., 0]
    box = smooth_l1(out[f'{stage}_deltas'] - out[f'{stage}_targets']).sum(-1)
    total += (jnp.sum(jnp.where(sampled, cls, 0)) + jnp.sum(jnp.where(labels > 0, box, 0))) / count
  return total


@pytest.fixture(scope='module')
def run():
  """(variables, training outputs, loss, gradient, detections) of the small model on two 64 x 64
  images, one program."""
  model = models.create_model('faster_rcnn', **SMALL)
  x = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3))

  def everything(x, targets):
    # Detections with the initial parameters, from init itself (targets are ignored there).
    detections, variables = model.init_with_output({'params': jax.random.key(1)}, x,
                                                   train=False, targets=targets)

    def loss(params):
      out, _ = model.apply({**variables, 'params': params}, x, train=True, targets=targets,
                           rngs={'sample': jax.random.key(2)}, mutable=['batch_stats'])
      return loss_of(out), out
    (value, out), grads = jax.value_and_grad(loss, has_aux=True)(variables['params'])
    return variables, out, value, grads, detections

  lowered = jax.jit(everything).lower(x, TARGETS)
  compiled = lowered.compile(compiler_options={'xla_backend_optimization_level': 0})
  return jax.tree.map(np.asarray, compiled(x, TARGETS))


def anchors_of_64():
  return ops.generate_anchors((64, 64), [(8, 8)], [(8.0, 16.0, 32.0)], (0.5, 1.0, 2.0))


def test_training_outputs_contract(run):
  _, out, value, _, _ = run
  a, r = 8 * 8 * 9, SMALL['box_batch_size_per_image']
  expected = {'rpn_logits': ((2, a), np.float32), 'rpn_deltas': ((2, a, 4), np.float32),
              'rpn_labels': ((2, a), np.int32), 'rpn_targets': ((2, a, 4), np.float32),
              'roi_logits': ((2, r, 5), np.float32), 'roi_deltas': ((2, r, 4), np.float32),
              'roi_labels': ((2, r), np.int32), 'roi_targets': ((2, r, 4), np.float32)}
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == expected
  assert all(np.isfinite(v).all() for v in out.values()) and np.isfinite(value)


def test_rpn_samples_within_quota_and_every_object_has_a_positive_anchor(run):
  _, out, _, _, _ = run
  labels, targets = out['rpn_labels'], out['rpn_targets']
  assert set(np.unique(labels)) <= {-1, 0, 1}
  assert ((labels >= 0).sum(1) <= 256).all() and ((labels == 1).sum(1) <= 128).all()
  assert (labels >= 0).sum(1)[0] == 256  # plenty of negatives: a full batch
  anchors = anchors_of_64()
  gt = BOXES[0, :3] * 64
  iou = np.asarray(jax.jit(ops.box_iou)(gt, anchors))
  assert (labels[0, iou.argmax(1)] == 1).all()  # each object's best anchor (few positives: all)
  # The targets decode on their anchors to the matched object (its best IoU), zeros elsewhere.
  positive = labels[0] == 1
  decoded = np.asarray(jax.jit(ops.decode)(targets[0][positive], anchors[positive]))
  np.testing.assert_allclose(decoded, gt[iou[:, positive].argmax(0)], atol=1e-4)
  assert not targets[0][~positive].any()


def test_rois_are_sampled_within_quota_with_the_objects_as_foreground(run):
  _, out, _, _, _ = run
  labels, targets = out['roi_labels'], out['roi_targets']
  fg = labels[0] > 0
  # At least the three ground-truth boxes appended to the proposals are foreground, within the
  # quota of 16 * 0.5.
  assert 3 <= fg.sum() <= 8 and (labels[0] >= 0).sum() <= 16
  assert set(labels[0, fg] - 1) <= {0, 1, 3} and not targets[0][~fg].any()


def test_an_image_without_objects_is_all_background(run):
  _, out, _, _, _ = run
  assert set(np.unique(out['rpn_labels'][1])) == {0, -1}  # 256 of the 576 anchors sampled
  assert (out['rpn_labels'][1] == 0).sum() == 256
  assert set(np.unique(out['roi_labels'][1])) <= {0, -1} and (out['roi_labels'][1] == 0).any()
  assert not out['rpn_targets'][1].any() and not out['roi_targets'][1].any()


def test_the_gradient_is_finite_and_reaches_every_part(run):
  _, _, _, grads, _ = run
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  for part in ('backbone', 'rpn_head', 'box_head'):
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads[part])), part
  for layer in ('fc6', 'fc7', 'cls_score', 'bbox_pred'):
    assert np.abs(grads['box_head'][layer]['kernel']).max() > 0, layer


def test_detections_contract(run):
  _, _, _, _, det = run
  d = SMALL['detections_per_image']
  assert {k: (v.shape, v.dtype) for k, v in det.items()} == {
      'boxes': ((2, d, 4), np.float32), 'scores': ((2, d), np.float32),
      'labels': ((2, d), np.int32), 'num_detections': ((2,), np.int32)}
  boxes, scores, labels = det['boxes'], det['scores'], det['labels']
  assert ((boxes >= 0) & (boxes <= 1)).all()
  assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()
  assert ((labels >= 0) & (labels < 4)).all()
  for i, n in enumerate(det['num_detections']):
    assert 0 <= n <= d and (np.diff(scores[i, :n]) <= 0).all() and (scores[i, :n] > 0.05).all()
    assert not boxes[i, n:].any() and not scores[i, n:].any() and not labels[i, n:].any()
  assert det['num_detections'].sum() > 0  # an untrained head's scores are ~1/5 > 0.05


def test_train_needs_targets_and_a_sample_rng():
  model = models.create_model('faster_rcnn', **SMALL)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, {'params': jax.random.key(0)}), x)
  one = {k: v[:1] for k, v in TARGETS.items()}
  apply = functools.partial(model.apply, variables, train=True, mutable=['batch_stats'])
  with pytest.raises(ValueError, match='train=True needs targets'):
    jax.eval_shape(lambda x: apply(x, rngs={'sample': jax.random.key(0)}), x)
  with pytest.raises(ValueError, match="'sample' rng"):
    jax.eval_shape(lambda x: apply(x, targets=one), x)
  with pytest.raises(ValueError, match=r"targets must be .* B = 1"):
    jax.eval_shape(lambda x: apply(x, targets=TARGETS, rngs={'sample': jax.random.key(0)}), x)


@pytest.mark.parametrize('overrides,message', [
    ({'rpn_nms_threshold': 1.5}, 'rpn_nms_threshold must be a number in'),
    ({'box_positive_fraction': 0}, r'box_positive_fraction must be a number in \(0, 1\]'),
    ({'anchor_sizes': ()}, 'anchor_sizes must be a non-empty sequence'),
    ({'detections_per_image': 0}, 'detections_per_image must be an int >= 1'),
    ({'rpn_bg_iou_threshold': 0.8}, 'rpn_bg_iou_threshold=0.8 must be <= rpn_fg_iou'),
    ({'box_batch_size_per_image': 200}, 'box_batch_size_per_image=200 must be <= rpn_post'),
    ({'backbone': 'alexnet'}, 'does not support features_only'),
    ({'backbone_args': {'features_only': True}}, "must not set 'features_only'"),
])
def test_bad_arguments_are_refused_by_name(overrides, message):
  with pytest.raises(ValueError, match=message):
    models.create_model('faster_rcnn', **overrides)


def test_a_resnet_backbone_and_another_level():
  """resnet18 (CIFAR stem: strides 1, 2, 4, 8) on 32 x 32, at its stride-4 stage: shapes only."""
  model = models.create_model('faster_rcnn', backbone='resnet18', feature_level=2,
                              backbone_args={'stem': 'cifar', 'widths': (4, 4, 8, 8)}, **{
                                  k: v for k, v in SMALL.items() if k != 'backbone_args'})
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, {'params': jax.random.key(0)}), x)
  assert variables['params']['box_head']['fc6']['kernel'].shape == (7 * 7 * 8, 16)
  out, _ = jax.eval_shape(lambda v, x: model.apply(
      v, x, train=True, targets=TARGETS, rngs={'sample': jax.random.key(0)},
      mutable=['batch_stats']), variables, x)
  assert out['rpn_logits'].shape == (2, 8 * 8 * 9)  # the 8 x 8 map of stride 4
  with pytest.raises(ValueError, match='feature_level=4 but backbone'):
    jax.eval_shape(models.create_model('faster_rcnn', feature_level=4).init,
                   jax.random.key(0), x)


# ---- the pieces against torchvision ----

def realistic_case(seed=0, objects=5):
  """576 anchors of a 64 x 64 image and `objects` boxes of 8-24 px (pixels), plus one padding."""
  rng = np.random.default_rng(seed)
  centre = rng.uniform(8, 56, (objects, 2))
  size = rng.uniform(8, 24, (objects, 2))
  gt = np.concatenate([centre - size / 2, centre + size / 2], -1).clip(0, 64).astype(np.float32)
  return anchors_of_64(), np.concatenate([gt, np.zeros((1, 4), np.float32)])


@pytest.mark.parametrize('seed', [0, 1])
def test_anchor_matching_is_torchvisions(seed):
  anchors, gt = realistic_case(seed)
  valid = np.arange(len(gt)) < len(gt) - 1
  matcher = tv_utils.Matcher(0.7, 0.3, allow_low_quality_matches=True)
  expected = matcher(tv_ops.box_iou(xy(gt[valid]), xy(anchors))).numpy()
  matches = jax.jit(lambda a, b, v: dt.match(ops.box_iou(a, b), v, 0.7, 0.3, True))(
      gt, anchors, valid)
  np.testing.assert_array_equal(matches, expected)
  assert (expected == -2).any() and (expected == -1).any() and (expected >= 0).any()
  # The RPN's labels before sampling: assign_targets_to_anchors.
  rpn = tv_rpn.RegionProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, {'training': 1},
                                     {'training': 1}, 0.7)
  labels, matched = rpn.assign_targets_to_anchors([xy(anchors)], [{'boxes': xy(gt[valid])}])
  anchor_labels = jax.jit(dt.anchor_labels)
  ours, index = anchor_labels(anchors, gt, valid)
  np.testing.assert_array_equal(ours, labels[0].numpy().astype(np.int32))
  positive = np.asarray(ours) == 1
  np.testing.assert_array_equal(gt[np.asarray(index)][positive], yx(matched[0])[positive])
  # Without objects every anchor is background.
  none, _ = anchor_labels(anchors, gt, np.zeros(len(gt), bool))
  assert not np.asarray(none).any()


def test_balanced_sampling_quotas():
  labels = jnp.asarray(np.repeat([1, 0, -1], [30, 500, 100]).astype(np.int32))
  sample = jax.jit(dt.sample_balanced, static_argnums=(2, 3))
  for key, (size, fraction) in enumerate([(256, 0.5), (64, 0.25), (1000, 0.5)]):
    pos, neg = sample(jax.random.key(key), labels, size, fraction)
    pos, neg = np.asarray(pos), np.asarray(neg)
    num_pos = min(30, int(size * fraction))
    assert pos.sum() == num_pos and neg.sum() == min(500, size - num_pos)
    assert (np.asarray(labels)[pos] == 1).all() and (np.asarray(labels)[neg] == 0).all()
  a, _ = sample(jax.random.key(0), labels, 64, 0.25)
  b, _ = sample(jax.random.key(1), labels, 64, 0.25)
  assert (np.asarray(a) != np.asarray(b)).any()  # random


def test_the_ground_truth_joins_the_rois_as_foreground():
  """add_gt_proposals: with no valid proposal, the sampled foreground is the objects themselves,
  labelled class + 1, with zero regression targets; padded objects take no part."""
  _, gt = realistic_case(2)
  proposals = np.tile(gt[:1], (40, 1))
  rois, labels, targets = jax.jit(functools.partial(
      dt.roi_targets, batch_size=16, positive_fraction=0.5))(
          jax.random.key(0), proposals, np.zeros(40, bool), gt,
          np.array([3, 0, 1, 2, 0, -1], np.int32), np.arange(6) < 5)
  rois, labels, targets = map(np.asarray, (rois, labels, targets))
  assert sorted(labels[labels > 0]) == [1, 1, 2, 3, 4] and (labels[5:] == -1).all()
  np.testing.assert_array_equal(np.sort(rois[labels > 0], 0), np.sort(gt[:5], 0))
  np.testing.assert_allclose(targets, 0, atol=1e-5)


def test_proposals_are_torchvisions_filter():
  rng = np.random.default_rng(3)
  anchors = anchors_of_64()
  logits = rng.normal(size=576).astype(np.float32) * 3
  deltas = rng.normal(size=(576, 4)).astype(np.float32) * 0.5
  deltas[:5, 2:] = -8  # decoded boxes under the 1e-3 pixel minimum
  ours = jax.jit(functools.partial(propose, image_size=(64, 64), pre_nms_top_n=300,
                                   post_nms_top_n=64, nms_threshold=0.7, min_size=1e-3))(
      jnp.asarray(anchors), jnp.asarray(logits), jnp.asarray(deltas))
  boxes, scores, valid = map(np.asarray, ours)
  rpn = tv_rpn.RegionProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, {'testing': 300},
                                     {'testing': 64}, 0.7).eval()
  coder = tv_utils.BoxCoder((1.0, 1.0, 1.0, 1.0))
  decoded = coder.decode(torch.tensor(deltas[:, [1, 0, 3, 2]]), [xy(anchors)]).reshape(1, -1, 4)
  expected_boxes, expected_scores = rpn.filter_proposals(
      decoded, torch.tensor(logits).reshape(1, -1), [(64, 64)], [576])
  n = len(expected_scores[0])
  assert valid.sum() == n and valid[:n].all()
  np.testing.assert_allclose(boxes[:n], yx(expected_boxes[0]), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(scores[:n], expected_scores[0].numpy(), rtol=1e-6)


@pytest.mark.parametrize('seed', [0, 1])
def test_postprocess_is_torchvisions(seed):
  rng = np.random.default_rng(seed)
  p, k = 64, 4
  centre = rng.uniform(0, 64, (p, 2))
  size = rng.uniform(2, 30, (p, 2))
  proposals = np.concatenate([centre - size / 2, centre + size / 2], -1).astype(np.float32)
  logits = (rng.normal(size=(p, k + 1)) * 2).astype(np.float32)
  deltas = rng.normal(size=(p, k + 1, 4)).astype(np.float32)
  deltas[:3, :, 2:] = -12  # boxes under 1e-2 pixels
  valid = np.arange(p) < p - 6  # padding proposals: torchvision gets the first 58
  boxes, scores, labels, kept = map(np.asarray, jax.jit(functools.partial(
      postprocess, image_size=(64, 64), score_threshold=0.05, nms_threshold=0.5,
      detections_per_image=20))(jnp.asarray(logits), jnp.asarray(deltas),
                                jnp.asarray(proposals), jnp.asarray(valid)))
  heads = tv_roi_heads.RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 20)
  m = int(valid.sum())
  tv_deltas = torch.tensor(deltas[:m][..., [1, 0, 3, 2]].reshape(m, -1))
  (tb,), (ts,), (tl,) = heads.postprocess_detections(torch.tensor(logits[:m]), tv_deltas,
                                                      [xy(proposals[:m])], [(64, 64)])
  n = len(ts)
  assert kept.sum() == n and kept[:n].all() and 5 < n <= 20
  np.testing.assert_array_equal(labels[:n], tl.numpy())
  np.testing.assert_allclose(scores[:n], ts.numpy(), rtol=1e-5)
  np.testing.assert_allclose(boxes[:n], yx(tb), rtol=1e-5, atol=1e-4)
