"""cnnlab.ops' detection operations against torchvision (the oracle): box coding (BoxCoder),
anchors (AnchorGenerator), NMS and batched NMS, RoIAlign (both formulations: gather, matmul) and
its gradient; jit, vmap, bad input.

Our boxes are (ymin, xmin, ymax, xmax) and torchvision's (x1, y1, x2, y2): `xy` swaps the
columns on the way. Tolerances: NMS and anchors must agree exactly (indices; anchors are rounded
integers). Coordinates in pixels (up to ~1e4) agree to rtol 1e-5 plus atol 1e-3 pixel (float32's
ulp at 1e4 is 1e-3; exp and log may differ by an ulp between XLA and torch). RoIAlign and its
gradient agree to atol 5e-5 on features of white noise N(0, 1), the hardest case: XLA may fuse a
multiply-add, or divide by the output size through its reciprocal, so that a sample's coordinate
(up to 50) is an ulp or two (4e-6 each) off torchvision's, and neighbouring pixels of the noise
differ by up to ~5 (the largest differences seen are 1.5e-5 forward and 2e-5 for the
gradient, against 5e-7 from the order of summation alone); on exactly representable
coordinates, at the edges, the two agree to 1e-6. Scores are distinct wherever an order could
depend on how ties break (except in the test of ties).

Fast by design: each jitted function is built once at module level with static arguments, and
the cases share a few shapes, so that the file compiles a handful of XLA programs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab import ops

torch = pytest.importorskip('torch')
tv_ops = pytest.importorskip('torchvision.ops')
tv_utils = pytest.importorskip('torchvision.models.detection._utils')
tv_anchors = pytest.importorskip('torchvision.models.detection.anchor_utils')
tv_image_list = pytest.importorskip('torchvision.models.detection.image_list')


def xy(boxes):
  """Ours (..., 4) yxyx <-> torchvision's xyxy, as a torch tensor."""
  return torch.tensor(np.asarray(boxes)[..., [1, 0, 3, 2]])


def yx(tensor):
  """torchvision's xyxy tensor -> our yxyx array."""
  return tensor.detach().numpy()[..., [1, 0, 3, 2]]


def random_boxes(rng, n, low=0.0, high=800.0, min_size=2.0, max_size=300.0):
  """n boxes (yxyx, float32) with corners in [low, high]-ish and sides in [min_size, max_size]."""
  centre = rng.uniform(low, high, size=(n, 2))
  size = np.exp(rng.uniform(np.log(min_size), np.log(max_size), size=(n, 2)))
  return np.concatenate([centre - size / 2, centre + size / 2], -1).astype(np.float32)


def clustered_boxes(rng, n, clusters, image=800.0):
  """n boxes around `clusters` objects, as an RPN's proposals are: each a jittered copy of its
  object (many overlap heavily), with distinct random scores."""
  objects = random_boxes(rng, clusters, 0, image, 16, 400)
  which = rng.integers(0, clusters, n)
  sides = np.concatenate([objects[which, 2:] - objects[which, :2]] * 2, -1)
  boxes = objects[which] + rng.normal(scale=0.15, size=(n, 4)).astype(np.float32) * sides
  boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]),
                          np.maximum(boxes[:, :2], boxes[:, 2:])], -1)
  scores = rng.permutation(n).astype(np.float32) / n + rng.uniform(0, 1e-4, n).astype(np.float32)
  return boxes.astype(np.float32), scores


# ---- box coding ----

@functools.partial(jax.jit, static_argnames='weights')
def code(truth, anchors, codes, weights):
  """encode, decode of class-specific codes (N, K, 4), and the round trip decode(encode)."""
  deltas = ops.encode(truth, anchors, weights)
  return deltas, ops.decode(codes, anchors[:, None], weights), ops.decode(deltas, anchors, weights)


@pytest.mark.parametrize('weights', [(10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0),
                                     (10.0, 5.0, 2.0, 1.0)])
def test_encode_and_decode_are_box_coders(weights):
  rng = np.random.default_rng(0)
  anchors = random_boxes(rng, 300)
  # Targets as an RPN sees them: shifted by up to a side, 1/7 to 7 times the anchor's size.
  centre, size = (anchors[:, :2] + anchors[:, 2:]) / 2, anchors[:, 2:] - anchors[:, :2]
  centre = centre + rng.uniform(-1, 1, size.shape) * size
  size = size * np.exp(rng.uniform(-2, 2, size.shape))
  truth = np.concatenate([centre - size / 2, centre + size / 2], -1).astype(np.float32)
  codes = rng.normal(scale=2.0, size=(300, 3, 4)).astype(np.float32)
  codes[:40, 0, 2:] = rng.uniform(5, 12, size=(40, 2)) * np.asarray(weights[2:], np.float32)

  deltas, boxes, round_trip = (np.asarray(x) for x in code(truth, anchors, codes, weights))
  coder = tv_utils.BoxCoder(tuple(weights[i] for i in (1, 0, 3, 2)))  # (wx, wy, ww, wh)
  expected = coder.encode_single(xy(truth), xy(anchors)).numpy()
  np.testing.assert_allclose(deltas, expected[:, [1, 0, 3, 2]], rtol=1e-5, atol=1e-5)
  expected = coder.decode_single(xy(codes).reshape(300, 12), xy(anchors)).reshape(300, 3, 4)
  np.testing.assert_allclose(boxes, yx(expected), rtol=1e-5, atol=1e-3)
  # The clamp: those 40 boxes are exp(log(1000 / 16)) = 62.5 times their anchors' size.
  np.testing.assert_allclose((boxes[:40, 0, 2:] - boxes[:40, 0, :2]) /
                             (anchors[:40, 2:] - anchors[:40, :2]), 62.5, rtol=1e-5)
  np.testing.assert_allclose(round_trip, truth, rtol=1e-5, atol=1e-3)


def test_clip_boxes_and_min_size_are_torchvisions():
  rng = np.random.default_rng(2)
  boxes = random_boxes(rng, 200, -100, 700, 0.5, 400)
  # A batch of two images of different sizes: one (height, width) per image, broadcast.
  sizes = np.array([[480.0, 640.0], [300.0, 200.0]], np.float32)

  @jax.jit
  def clip_and_mask(boxes, sizes):
    return (ops.clip_boxes(boxes, sizes[:, :1], sizes[:, 1:]), ops.min_size_mask(boxes, 5.0))

  clipped, mask = clip_and_mask(np.stack([boxes, boxes]), sizes)
  for image, (height, width) in enumerate([(480, 640), (300, 200)]):
    expected = tv_ops.clip_boxes_to_image(xy(boxes), (height, width))
    np.testing.assert_array_equal(clipped[image], yx(expected))
  keep = tv_ops.remove_small_boxes(xy(boxes), 5.0).numpy()
  np.testing.assert_array_equal(np.flatnonzero(mask[0]), keep)


# ---- anchors ----

@pytest.mark.parametrize('image_size,feature_sizes,sizes,ratios', [
    ((600, 800), [(38, 50)], ((32, 64, 128),), ((0.5, 1.0, 2.0),)),  # stride (15, 16)
    ((256, 320), [(64, 80), (32, 40)], ((32,), (64,)), ((0.5, 1.0, 2.0),) * 2),
    ((512, 640), [(128, 160), (64, 80), (32, 40), (16, 20), (8, 10)],  # FPN's
     ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5),
    ((200, 300), [(13, 19)], ((48, 96),), ((0.7, 1.3, 3.0),)),  # stride (15, 15)
])
def test_anchors_are_anchor_generators(image_size, feature_sizes, sizes, ratios):
  generator = tv_anchors.AnchorGenerator(sizes, ratios)
  images = tv_image_list.ImageList(torch.zeros(1, 3, *image_size), [image_size])
  maps = [torch.zeros(1, 1, h, w) for h, w in feature_sizes]
  expected = yx(generator(images, maps)[0])
  anchors = ops.generate_anchors(image_size, feature_sizes, sizes, ratios)
  assert anchors.dtype == np.float32
  np.testing.assert_array_equal(anchors, expected)
  assert ops.num_anchors_per_location(sizes, ratios) == generator.num_anchors_per_location()
  if len(sizes) == 1:  # a flat sequence of ratios is every level's
    np.testing.assert_array_equal(ops.generate_anchors(image_size, feature_sizes, sizes, ratios[0]),
                                  expected)


def test_anchor_order_is_location_major():
  base = ops.base_anchors((32, 64), (0.5, 1.0, 2.0))
  anchors = ops.grid_anchors((3, 4), (16, 8), base)
  assert anchors.shape == (3 * 4 * 6, 4)
  # Location (i, j) = (2, 1), anchor 5: row (2 * 4 + 1) * 6 + 5, shifted by (2 * 16, 1 * 8).
  np.testing.assert_array_equal(anchors[(2 * 4 + 1) * 6 + 5], base[5] + [32, 8, 32, 8])
  # Ratio-major: ratio 2 (twice as high as wide), size 64: 64 * sqrt(2) ~ 90.5 high, 45.3 wide.
  np.testing.assert_array_equal(base[5], [-45, -23, 45, 23])


# ---- NMS ----

@functools.partial(jax.jit, static_argnames=('iou_threshold', 'max_output'))
def nms(boxes, scores, valid, iou_threshold, max_output):
  return ops.nms(boxes, scores, iou_threshold, max_output, valid)


@functools.partial(jax.jit, static_argnames=('iou_threshold', 'max_output'))
def batched_nms(boxes, scores, classes, valid, iou_threshold, max_output):
  return ops.batched_nms(boxes, scores, classes, iou_threshold, max_output, valid)


def kept(result):
  indices, valid = (np.asarray(r) for r in result)
  count = valid.sum()
  assert valid[:count].all() and not valid[count:].any()  # the kept boxes, then padding
  assert (indices[~valid] == 0).all()
  return indices[valid]


def padded(boxes, scores):
  """Boxes and scores padded to the 2000 candidates of the compiled nms, and the valid mask."""
  n = len(boxes)
  return (np.pad(boxes, [(0, 2000 - n), (0, 0)]), np.pad(scores, (0, 2000 - n)),
          np.arange(2000) < n)


@pytest.mark.parametrize('iou_threshold', [0.7, 0.5])
def test_nms_is_torchvisions_on_clustered_proposals(iou_threshold):
  rng = np.random.default_rng(3)
  boxes, scores = clustered_boxes(rng, 2000, 60)
  expected = tv_ops.nms(xy(boxes), torch.tensor(scores), iou_threshold).numpy()
  assert 60 < len(expected) < 1500  # the case suppresses a lot, and keeps a lot
  every = np.ones(2000, bool)
  np.testing.assert_array_equal(kept(nms(boxes, scores, every, iou_threshold, 2000)), expected)


def test_batched_nms_is_torchvisions(iou_threshold=0.5):  # the box head's (the RPN's is 0.7)
  rng = np.random.default_rng(4)
  boxes, scores = clustered_boxes(rng, 2000, 60)
  classes = rng.integers(0, 5, 2000).astype(np.int32)
  # 2000 boxes take torchvision's class-by-class path; 200 its coordinate offsets.
  for n in (2000, 200):
    expected = tv_ops.batched_nms(xy(boxes[:n]), torch.tensor(scores[:n]),
                                  torch.tensor(classes[:n]), iou_threshold).numpy()
    plain = tv_ops.nms(xy(boxes[:n]), torch.tensor(scores[:n]), iou_threshold).numpy()
    assert len(expected) > len(plain)  # classes matter here
    b, s, valid = padded(boxes[:n], scores[:n])
    got = kept(batched_nms(b, s, np.pad(classes[:n], (0, 2000 - n)), valid, iou_threshold, 2000))
    np.testing.assert_array_equal(got, expected)


def test_nms_never_keeps_invalid_or_minus_infinity_boxes():
  rng = np.random.default_rng(5)
  boxes, scores = clustered_boxes(rng, 2000, 60)
  valid = rng.uniform(size=2000) < 0.7
  scores[rng.uniform(size=2000) < 0.1] = -np.inf
  usable = np.flatnonzero(valid & (scores > -np.inf))
  expected = usable[tv_ops.nms(xy(boxes[usable]), torch.tensor(scores[usable]), 0.7).numpy()]
  got = kept(nms(boxes, scores, valid, 0.7, 2000))
  np.testing.assert_array_equal(got, expected)
  # Nothing usable: nothing kept.
  indices, mask = nms(boxes, np.full(2000, -np.inf, np.float32), valid, 0.7, 2000)
  assert not np.asarray(mask).any() and not np.asarray(indices).any()


def test_nms_ties_and_thresholds_are_torchvisions():
  # Equal scores: the lower index first (a stable sort), as torchvision's CPU kernel does; an
  # identical box of equal score is suppressed by the lower index.
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [200, 0, 210, 10.5],
                    [50, 50, 60, 60], [100, 100, 101, 101]], np.float32)
  scores = np.array([0.5, 0.5, 0.5, 0.9, 0.5, 0.5], np.float32)
  expected = tv_ops.nms(xy(boxes), torch.tensor(scores), 0.5).numpy()
  np.testing.assert_array_equal(kept(nms(*padded(boxes, scores), 0.5, 2000)), expected)
  assert list(expected) == [3, 0, 2, 5]
  # IoU exactly the threshold does not suppress (strictly greater suppresses) ...
  boxes = np.array([[0, 0, 1, 2], [0, 0, 1, 1]], np.float32)
  scores = np.array([0.9, 0.8], np.float32)
  assert list(kept(nms(*padded(boxes, scores), 0.5, 2000))) == [0, 1]  # IoU 1 / 2
  assert list(tv_ops.nms(xy(boxes), torch.tensor(scores), 0.5)) == [0, 1]
  # ... and the float32 IoU 3 / 10 rounds up, so it is greater than the float64 threshold 0.3: it
  # suppresses in torchvision, and here too (a threshold rounded to float32 would keep it).
  boxes = np.array([[0, 0, 1, 3], [0, 0, 1, 10]], np.float32)  # intersection 3, union 10
  assert list(tv_ops.nms(xy(boxes), torch.tensor(scores), 0.3)) == [0]
  assert list(kept(nms(*padded(boxes, scores), 0.3, 2000))) == [0]


def test_nms_vmaps_over_a_batch_of_images():
  rng = np.random.default_rng(6)
  data = [clustered_boxes(rng, 2000, 60) for _ in range(2)]
  boxes, scores = (np.stack(x) for x in zip(*data))
  valid = np.ones((2, 2000), bool)
  valid[1, 1500:] = False  # a padded image
  indices, mask = jax.vmap(lambda b, s, v: nms(b, s, v, 0.7, 300))(boxes, scores, valid)
  for b in range(2):
    n = 2000 if b == 0 else 1500
    expected = tv_ops.nms(xy(boxes[b, :n]), torch.tensor(scores[b, :n]), 0.7).numpy()
    assert len(expected) > 300  # capped: the first max_output of torchvision's answer
    np.testing.assert_array_equal(kept((indices[b], mask[b])), expected[:300])


# ---- RoIAlign ----

roi_align = jax.jit(ops.roi_align, static_argnums=(2, 3, 4, 5, 6))
FEATURES = (2, 50, 50, 16)


def roi_case(spatial_scale, seed=7):
  """Features (2, 50, 50, 16) and 64 boxes per image in input pixels (the image is
  50 / spatial_scale wide): ordinary boxes, boxes over the borders and touching them, boxes
  smaller than a feature pixel, degenerate, entirely outside, and with samples exactly on the
  edges."""
  rng = np.random.default_rng(seed)
  features = rng.normal(size=FEATURES).astype(np.float32)
  image = 50 / spatial_scale
  boxes = random_boxes(rng, 2 * 64, -0.1 * image, 1.1 * image, 0.2 / spatial_scale, 0.8 * image)
  boxes = boxes.reshape(2, 64, 4)
  boxes[:, :4] = [[0, 0, image, image], [-20, -30, 0.5 * image, image + 40],
                  [0.5 * image, 0.2 * image, image, image], [image - 3, 0, image, 10]]
  boxes[:, 4] = [-90, -100, -40, -30]  # above and to the left of the map
  boxes[:, 5] = [image + 40, 10, image + 90, 90]  # below it
  boxes[:, 6] = [100, 100, 100, 100]  # a point
  boxes[:, 7] = [10, 10, 10 + 0.3 / spatial_scale, 10 + 0.4 / spatial_scale]  # under a pixel
  boxes[:, 8] = [30, 40, 20, 10]  # inverted
  # Samples exactly at the edges: 14 x 14 feature pixels make bins of 2, samples at start + 0.5,
  # 1.5, ..., 13.5, all exact (with aligned, half a pixel less): first samples at -1.25 (off),
  # -1 (read as at 0), last at 50 = H (reads the last row alone) and 50.25 (off).
  for k, start in enumerate([-1.75, -1.5, 36.5, 36.75]):
    boxes[:, 9 + k] = np.array([start, 10, start + 14, 24]) / spatial_scale
    boxes[:, 13 + k] = np.array([10, start, 24, start + 14]) / spatial_scale
  return features, boxes


def torch_roi_align(features, boxes, spatial_scale, aligned, grad=None):
  t = torch.tensor(features.transpose(0, 3, 1, 2), requires_grad=grad is not None)
  out = tv_ops.roi_align(t, list(xy(boxes)), (7, 7), spatial_scale, 2, aligned)
  out = out.reshape(2, 64, -1, 7, 7).permute(0, 1, 3, 4, 2)
  if grad is None:
    return out.detach().numpy()
  out.backward(torch.tensor(grad))
  return out.detach().numpy(), t.grad.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize('method', ['gather', 'matmul'])
@pytest.mark.parametrize('spatial_scale', [1 / 16, 1 / 4])
@pytest.mark.parametrize('aligned', [True, False])
def test_roi_align_is_torchvisions(spatial_scale, aligned, method):
  features, boxes = roi_case(spatial_scale)
  out = roi_align(features, boxes, (7, 7), spatial_scale, 2, aligned, method)
  assert out.shape == (2, 64, 7, 7, 16)
  expected = torch_roi_align(features, boxes, spatial_scale, aligned)
  np.testing.assert_allclose(out, expected, atol=5e-5, rtol=0)
  np.testing.assert_allclose(out[:, 9:17], expected[:, 9:17], atol=1e-6, rtol=0)  # exact edges
  assert not np.asarray(out[:, 4:6]).any() and np.asarray(out[:, 0]).all()  # off the map: 0


@pytest.mark.parametrize('method', ['gather', 'matmul'])
def test_roi_align_gradient_is_torch_autograds(method):
  features, boxes = roi_case(1 / 16, seed=8)
  cotangent = np.random.default_rng(9).normal(size=(2, 64, 7, 7, 16)).astype(np.float32)
  expected, expected_grad = torch_roi_align(features, boxes, 1 / 16, True, cotangent)

  def loss(f, b):
    return jnp.sum(ops.roi_align(f, b, 7, 1 / 16, 2, True, method) * cotangent)

  value, (grad, box_grad) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(features, boxes)
  np.testing.assert_allclose(value, np.sum(expected * cotangent), rtol=1e-5)
  np.testing.assert_allclose(grad, expected_grad, atol=5e-5, rtol=0)
  assert not np.asarray(box_grad).any()  # as in torchvision: no gradient for the boxes


def test_roi_align_bad_input_is_refused_by_name():
  features, boxes = np.zeros((2, 8, 8, 3), np.float32), np.zeros((2, 5, 4), np.float32)
  with pytest.raises(ValueError, match=r'sampling_ratio .* got -1'):
    ops.roi_align(features, boxes, 7, 1.0, -1)
  with pytest.raises(ValueError, match=r'sampling_ratio .* got 0'):
    ops.roi_align(features, boxes, 7, 1.0, 0)
  with pytest.raises(ValueError, match=r'boxes must have shape \(B, K, 4\).*\(2, 5, 5\)'):
    ops.roi_align(features, np.zeros((2, 5, 5), np.float32), 7, 1.0, 2)
  with pytest.raises(ValueError, match=r'boxes .* B = 2, got \(3, 5, 4\)'):
    ops.roi_align(features, np.zeros((3, 5, 4), np.float32), 7, 1.0, 2)
  with pytest.raises(ValueError, match=r'features must have shape \(B, H, W, C\)'):
    ops.roi_align(features[0], boxes, 7, 1.0, 2)
  with pytest.raises(ValueError, match=r'output_size .* got \(7, 0\)'):
    ops.roi_align(features, boxes, (7, 0), 1.0, 2)
  with pytest.raises(ValueError, match=r'spatial_scale .* got 0'):
    ops.roi_align(features, boxes, 7, 0, 2)
  with pytest.raises(ValueError, match=r"method must be one of .* got 'dense'"):
    ops.roi_align(features, boxes, 7, 1.0, 2, method='dense')


def test_roi_align_auto_multiplies_on_small_maps_only():
  """'auto' is 'matmul' up to 64 s^2 map pixels (16 x 16 at s = 2): same numbers either way."""
  rng = np.random.default_rng(3)
  for size, method in ((16, 'matmul'), (17, 'gather')):
    features = rng.normal(size=(1, size, size, 2)).astype(np.float32)
    boxes = np.array([[[1.0, 2.0, 9.5, 13.0], [-3.0, 4.0, 30.0, 20.0]]], np.float32)
    jaxpr = str(jax.make_jaxpr(lambda f: ops.roi_align(f, boxes, 3, 0.5, 2))(features))
    assert ('dot_general' in jaxpr) == (method == 'matmul'), size
    np.testing.assert_allclose(ops.roi_align(features, boxes, 3, 0.5, 2),
                               ops.roi_align(features, boxes, 3, 0.5, 2, method=method),
                               atol=0, rtol=0)


def test_box_ops_bad_input_is_refused_by_name():
  boxes = np.zeros((5, 4), np.float32)
  with pytest.raises(ValueError, match=r'boxes must have shape \(N, 4\), got \(5, 3\)'):
    ops.nms(boxes[:, :3], np.zeros(5, np.float32), 0.5, 3)
  with pytest.raises(ValueError, match=r'scores must have shape \(N,\) = \(5,\), got \(4,\)'):
    ops.nms(boxes, np.zeros(4, np.float32), 0.5, 3)
  with pytest.raises(ValueError, match=r'max_output must be a positive int .* got 0'):
    ops.nms(boxes, np.zeros(5, np.float32), 0.5, 0)
  with pytest.raises(ValueError, match=r'classes must have shape \(N,\) = \(5,\), got \(5, 1\)'):
    ops.batched_nms(boxes, np.zeros(5, np.float32), np.zeros((5, 1), np.int32), 0.5, 3)
  with pytest.raises(ValueError, match=r'valid must have shape'):
    ops.nms(boxes, np.zeros(5, np.float32), 0.5, 3, np.ones(4, bool))
  with pytest.raises(ValueError, match=r'deltas must have shape \(\.\.\., 4\), got \(5, 3\)'):
    ops.decode(boxes[:, :3], boxes)
  with pytest.raises(ValueError, match=r'proposals must have shape \(\.\.\., 4\), got \(5, 5\)'):
    ops.encode(boxes, np.zeros((5, 5), np.float32))
  with pytest.raises(ValueError, match=r'weights must be 4 numbers .* got \(1\.0, 1\.0\)'):
    ops.encode(boxes, boxes, (1, 1))
  with pytest.raises(ValueError, match=r'feature_size must be a pair of positive ints .* \(0, 4\)'):
    ops.grid_anchors((0, 4), (8, 8), ops.base_anchors((32,), (1.0,)))
  with pytest.raises(ValueError, match=r'sizes must be a non-empty sequence of positive numbers'):
    ops.base_anchors((), (1.0,))
  with pytest.raises(ValueError, match=r'one feature size per level, got 1 .* 2 levels'):
    ops.generate_anchors((64, 64), [(8, 8)], ((32,), (64,)))
