"""cnnlab.tasks.coco_eval against pycocotools' COCOeval (iouType='bbox'), the oracle, on the same
boxes: the 12 summary numbers and the whole precision (T, R, K, A, M) and recall arrays.

COCOeval prints 3 decimals, so 1e-3 would do; but the evaluator repeats COCOeval's float64
operations (bbIou's, the area and IoU comparisons, the stable sorts, precision = tp / (fp + tp +
eps), the mean over the same elements in the same order), and the numbers come out equal (a
difference of 0 here): the tests ask for 1e-12, which leaves room for a compiler's rounding only."""

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cnnlab.tasks import coco_eval
from cnnlab.tasks.coco_eval import CocoEvaluator

KEYS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')
EXACT = 1e-12


def oracle(images, num_classes, **params):
  """COCOeval on `images`, a list of (boxes, scores, labels, gt_boxes, gt_labels) in pixels, each
  box (ymin, xmin, ymax, xmax); image i is COCO image i + 1, class k category k + 1. Annotation
  ids start at 1: COCOeval takes a match to id 0 for no match. `params`: COCOeval.params to set.
  -> (stats, precision, recall)."""
  def xywh(box):
    y0, x0, y1, x1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]

  truth = {'images': [{'id': i + 1} for i in range(len(images))],
           'categories': [{'id': k + 1} for k in range(num_classes)], 'annotations': []}
  results = []
  for i, (boxes, scores, labels, gt_boxes, gt_labels) in enumerate(images):
    for box, label in zip(gt_boxes, gt_labels):
      x, y, w, h = xywh(box)
      truth['annotations'].append({'id': len(truth['annotations']) + 1, 'image_id': i + 1,
                                   'category_id': int(label) + 1, 'bbox': [x, y, w, h],
                                   'area': w * h, 'iscrowd': 0})
    results += [{'image_id': i + 1, 'category_id': int(label) + 1, 'bbox': xywh(box),
                 'score': float(score)} for box, score, label in zip(boxes, scores, labels)]
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = truth
    coco.createIndex()
    evaluation = COCOeval(coco, coco.loadRes(results), 'bbox')
    for name, value in params.items():
      setattr(evaluation.params, name, value)
    evaluation.evaluate()
    evaluation.accumulate()
    if not params:  # its summary assumes the default parameters
      evaluation.summarize()
  return dict(zip(KEYS, evaluation.stats)), evaluation.eval['precision'], evaluation.eval['recall']


def ours(images, num_classes, **kwargs):
  evaluator = CocoEvaluator(num_classes, image_size=None, **kwargs)
  for image in images:
    evaluator.add(*image)
  return evaluator


def assert_as_oracle(images, num_classes, iou_thresholds=None, max_detections=None):
  """Both evaluations agree; -> (our summary, the largest difference)."""
  settings = {'iou_thresholds': iou_thresholds, 'max_detections': max_detections}
  stats, precision, recall = oracle(
      images, num_classes,
      **{n: v for n, v in zip(('iouThrs', 'maxDets'), settings.values()) if v is not None})
  evaluator = ours(images, num_classes, **{n: v for n, v in settings.items() if v is not None})
  summary = evaluator.summarize()
  our_precision, our_recall = evaluator.accumulate()
  # COCOeval's AP/AP50/... are at maxDets=100 whatever maxDets are; ours at the largest.
  keys = KEYS if max_detections is None else ()
  difference = max(max((abs(summary[k] - stats[k]) for k in keys), default=0.),
                   np.abs(our_precision - precision).max(), np.abs(our_recall - recall).max())
  assert difference <= EXACT, (summary, stats)
  return summary, difference


def random_box(rng, size, low=2.0):
  """A (ymin, xmin, ymax, xmax) box inside a size x size image, sides log-uniform in [low, size]."""
  h, w = np.exp(rng.uniform(np.log(low), np.log(size), 2))
  y, x = rng.uniform(0, size - h), rng.uniform(0, size - w)
  return np.array([y, x, y + h, x + w])


def random_images(rng, count, num_classes, sizes=(64, 640), max_objects=6, max_detections=100):
  """Images with 0-`max_objects` objects of every size; detections jitter the objects (some with
  the wrong class, some missed), plus false positives, up to `max_detections`; random scores.
  Every 10th image has no object, every 7th no detection."""
  images = []
  for i in range(count):
    size = sizes[i % len(sizes)]
    n = 0 if i % 10 == 3 else rng.integers(0, max_objects + 1)
    gt_boxes = np.array([random_box(rng, size) for _ in range(n)]).reshape(n, 4)
    gt_labels = rng.integers(0, num_classes, n)
    boxes, labels = [], []
    for box, label in zip(gt_boxes, gt_labels):
      for _ in range(rng.choice([0, 1, 1, 2, 3])):
        extent = np.tile(box[2:] - box[:2], 2)
        jittered = box + rng.normal(0, rng.choice([.03, .1, .3]), 4) * extent
        boxes.append(np.concatenate([np.minimum(jittered[:2], jittered[2:]),
                                     np.maximum(jittered[:2], jittered[2:])]))
        labels.append(label if rng.random() < .85 else rng.integers(num_classes))
    for _ in range(rng.integers(0, 12)):
      boxes.append(random_box(rng, size))
      labels.append(rng.integers(num_classes))
    k = 0 if i % 7 == 5 else min(len(boxes), max_detections)
    boxes = np.array(boxes[:k]).reshape(k, 4)
    images.append((boxes, rng.random(k), np.array(labels[:k], np.int64).reshape(k), gt_boxes,
                   gt_labels))
  return images


def test_a_realistic_split_equals_cocoeval(monkeypatch):
  monkeypatch.setattr(coco_eval, 'CHUNK', 16)  # matched 16 images at a time, as a long split is
  images = random_images(np.random.default_rng(0), 200, 6)
  summary, difference = assert_as_oracle(images, 6)
  # Every area range has objects, and the numbers are neither trivial nor -1.
  assert all(0.05 < summary[k] < 0.95 for k in KEYS), summary
  print(f'largest difference from COCOeval: {difference:.3g}')


def test_perfect_detections_score_one():
  rng = np.random.default_rng(1)
  images = [(g, rng.random(len(g)), l, g, l) for *_, g, l in random_images(rng, 40, 3)]
  summary, _ = assert_as_oracle(images, 3)
  # AR1 keeps one detection per image and class, and images have several objects of a class.
  assert all(summary[k] == 1.0 for k in KEYS if k != 'AR1') and summary['AR1'] < 1, summary


def test_tied_scores_keep_the_given_order(monkeypatch):
  monkeypatch.setattr(coco_eval, 'CHUNK', 7)  # ties across the images matched together
  rng = np.random.default_rng(2)
  images = [(b, rng.integers(0, 3, len(s)) / 2, l, g, gl)
            for b, s, l, g, gl in random_images(rng, 60, 3)]
  # Several detections of one object with the same score and IoU: the order decides the match.
  box = np.array([[10., 10., 30., 30.]])
  images.append((np.repeat(box, 3, 0), np.ones(3), np.zeros(3, int), np.repeat(box, 2, 0),
                 np.zeros(2, int)))
  assert_as_oracle(images, 3)


def image(boxes, gt_boxes):
  """One image of class 0, scores falling in the order given."""
  boxes, gt_boxes = np.array(boxes, float), np.array(gt_boxes, float)
  return boxes, 1 - np.arange(len(boxes)) / 10, np.zeros(len(boxes), int), gt_boxes, \
      np.zeros(len(gt_boxes), int)


def test_the_matching_rules_of_cocoeval():
  """Each image is a rule COCOeval's greedy matching follows that random boxes almost never test:
  without it the numbers differ."""
  images = [
      # Equal IoUs (2/3): the first detection takes the later object, leaving the second
      # detection (IoU 9/11 with the later object, 1/3 with the first) unmatched.
      image([[0, 2, 10, 12], [0, 5, 10, 15]], [[0, 0, 10, 10], [0, 4, 10, 14]]),
      # For small objects, a 33 x 33 object is ignored: the 32 x 32 detection takes the small
      # object (IoU .88) although the ignored one fits better (IoU .94).
      image([[0, 0, 32, 32]], [[0, 0, 30, 30], [0, 0, 33, 33]]),
      # Areas on the bounds, 32^2 and 96^2, belong to both ranges.
      image([[0, 0, 32, 32], [50, 50, 146, 146], [0, 0, 96, 96]],
            [[0, 0, 32, 32], [50, 50, 146, 146]]),
      image([[1, 1, 33, 33]], [[0, 0, 96, 96]]),
  ]
  assert_as_oracle(images, 1)
  # IoU 1 - 1e-11 reaches the threshold 1, which COCOeval takes as 1 - 1e-10.
  images.append(image([[0, 0, 100, 100 - 1e-9]], [[0, 0, 100, 100]]))
  assert_as_oracle(images, 1, iou_thresholds=np.array([.5, .9, 1.]), max_detections=[1, 2])


def test_a_class_without_objects_and_a_class_without_detections():
  rng = np.random.default_rng(3)
  images = random_images(rng, 50, 4)
  # Class 3: detections only. Class 2: objects only.
  images = [(b[l != 2], s[l != 2], l[l != 2], g[gl != 3], gl[gl != 3])
            for b, s, l, g, gl in images]
  summary, _ = assert_as_oracle(images, 4)
  precision, recall = ours(images, 4).accumulate()
  assert (precision[:, :, 3] == -1).all() and (recall[:, 3] == -1).all()
  assert (precision[:, :, 2, 0] == 0).all() and (recall[:, 2, 0] == 0).all()
  assert 0 < summary['AP'] < 1


def test_more_than_100_detections_in_an_image():
  rng = np.random.default_rng(4)
  images = random_images(rng, 12, 2, sizes=(640,), max_objects=40, max_detections=1000)
  for i in range(0, 12, 3):  # 150 detections, 120 of class 0: the cut is per image and class
    b, _, _, g, gl = images[i]
    boxes = np.array([random_box(rng, 640) for _ in range(150)])
    boxes[:len(g)] = g
    images[i] = (boxes, rng.random(150), (np.arange(150) >= 120).astype(int), g, gl)
  assert max(len(b) for b, *_ in images) > 100
  assert_as_oracle(images, 2)


def pad(arrays, length, fill):
  return np.stack([np.concatenate([a, np.full((length - len(a), *a.shape[1:]), fill, a.dtype)])
                   for a in arrays])


@pytest.mark.parametrize('fractions', [False, True])
def test_a_padded_batch_equals_image_by_image(fractions):
  """Padding (here garbage: inverted boxes, NaN scores, labels out of range) is not read; boxes
  in image fractions with `image_size` equal the same boxes in pixels."""
  rng = np.random.default_rng(5)
  size = np.array([480., 640., 480., 640.])
  images = random_images(rng, 37, 3, sizes=(480,))
  if fractions:
    images = [(b / size, s, l, g / size, gl) for b, s, l, g, gl in images]
  evaluator = CocoEvaluator(3, image_size=(480, 640) if fractions else None)
  for start in range(0, 37, 8):
    chunk = images[start:start + 8]
    k, n = max(len(c[0]) for c in chunk) + 2, max(len(c[3]) for c in chunk) + 1
    columns = list(zip(*chunk))
    evaluator.add(pad(columns[0], k, -5.), pad(columns[1], k, np.nan), pad(columns[2], k, -1),
                  pad(columns[3], n, -5.), pad(columns[4], n, 7),
                  num_detections=[len(b) for b in columns[0]],
                  num_objects=[len(g) for g in columns[3]])
    if start == 8:
      evaluator.summarize()  # a summary on the way changes nothing
  pixels = [(b * size, s, l, g * size, gl) for b, s, l, g, gl in images] if fractions else images
  reference = ours(pixels, 3)
  assert evaluator.num_images == 37
  assert evaluator.summarize() == reference.summarize()
  for a, b in zip(evaluator.accumulate(), reference.accumulate()):
    np.testing.assert_array_equal(a, b)


def test_no_detections_and_no_objects():
  evaluator = CocoEvaluator(2, image_size=None)
  evaluator.add(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), np.zeros((0, 4)), np.zeros(0, int))
  assert set(evaluator.summarize().values()) == {-1.0}
  evaluator.add(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), [[0., 0., 40., 40.]], [1])
  summary = evaluator.summarize()
  assert summary['AP'] == summary['APm'] == summary['AR100'] == 0.0
  assert summary['APs'] == summary['APl'] == -1.0


def test_bad_input_is_refused_by_name_and_index():
  evaluator = CocoEvaluator(3, image_size=None)
  box, one = np.array([[0., 0., 10., 10.]]), np.ones(1)
  with pytest.raises(ValueError, match=r'gt_boxes\[1\] = \[5.0, 0.0, 4.0, 1.0\]: .*min <= max'):
    evaluator.add(box, one, [0], [[0., 0., 1., 1.], [5., 0., 4., 1.]], [0, 0])
  with pytest.raises(ValueError, match=r'boxes\[1, 0\] = .*min <= max'):
    evaluator.add(np.array([box, [[0., 9., 1., 1.]]]), [one, one], [[0], [0]], [box, box],
                  [[0], [0]])
  with pytest.raises(ValueError, match=r'labels\[2\] = 3: expected a class in \[0, 3\)'):
    evaluator.add(np.repeat(box, 3, 0), np.ones(3), [0, 1, 3], box, [0])
  with pytest.raises(ValueError, match=r'gt_labels\[0, 0\] = -1'):
    evaluator.add(box[None], one[None], [[0]], box[None], [[-1]])
  with pytest.raises(ValueError, match=r'scores: expected shape \(K\) with K=1, got \(2,\)'):
    evaluator.add(box, np.ones(2), [0], box, [0])
  with pytest.raises(ValueError, match=r'boxes: expected shape \(K, 4\) or \(B, K, 4\)'):
    evaluator.add(np.ones(4), one, [0], box, [0])
  with pytest.raises(ValueError, match=r'gt_boxes: expected shape \(N, 4\) with N=1, got \(1, 5\)'):
    evaluator.add(box, one, [0], np.ones((1, 5)), [0])
  with pytest.raises(ValueError, match=r'num_objects\[1\] = 2: expected a count in \[0, 1\]'):
    evaluator.add(box[None].repeat(2, 0), np.ones((2, 1)), np.zeros((2, 1), int),
                  box[None].repeat(2, 0), np.zeros((2, 1), int), num_objects=[1, 2])
  with pytest.raises(ValueError, match=r'labels: expected integers'):
    evaluator.add(box, one, [0.5], box, [0])
  with pytest.raises(ValueError, match=r'scores\[0\] = nan'):
    evaluator.add(box, [np.nan], [0], box, [0])
  with pytest.raises(ValueError, match='image_size'):
    CocoEvaluator(3, image_size=(0, 10))
  assert evaluator.num_images == 0 and evaluator.summarize()['AP'] == -1.0
