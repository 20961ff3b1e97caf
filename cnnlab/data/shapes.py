"""`shapes`: procedural coloured shapes on textured backgrounds, with masks and boxes.

Every example is a pure function of (dataset_seed, split, index): one shape of a random kind (the
label), colour, size, rotation and position on a random texture (smooth colour noise mixed with
stripes). The kinds are `num_classes` consecutive entries of `SHAPE_NAMES` from `first_kind`, so
a network pretrained on some kinds can be transferred to others.
Each example carries
  image  (R, R, 3) uint8
  label  ()        0 <= label < num_classes: the kind SHAPE_NAMES[first_kind + label]
  mask   (R, R)    uint8, 0 = background, label + 1 where the shape covers at least half a pixel
  bbox   (4,)      float32 (ymin, xmin, ymax, xmax) in [0, 1]: the tight box around `mask`
for classification, segmentation, localisation and translation-invariance experiments
(`position='split'` draws train shapes in the left half and test shapes in the right).

With `max_objects` = N >= 1 (object detection and instance segmentation), an example holds
min_objects..N shapes instead (uniformly many, each of a uniformly random label; 0 is allowed:
an image of background alone), later ones drawn over earlier ones, and carries
  image        (R, R, 3) uint8
  labels       (N,)      int32, objects 0..num_objects-1 first, then PAD_LABEL (-1)
  boxes        (N, 4)    float32 (ymin, xmin, ymax, xmax) in [0, 1], pixel edges over the side:
                         the tight box around the object's VISIBLE pixels (its `instances`
                         pixels); zeros after the objects
  num_objects  ()        int32, the number of objects, min_objects..N
  mask         (R, R)    uint8 semantic mask, 0 = background, labels[i] + 1 on object i's pixels
  instances    (R, R)    uint8, 0 = background, i + 1 where object i is the top-most shape
                         covering at least half the pixel
Every counted object is visible: >= MIN_VISIBLE_PIXELS pixels and >= MIN_VISIBLE_FRACTION of the
pixels it covered when drawn (a shape is re-drawn until that holds for all of them), and two
objects' boxes overlap by an IoU of at most `max_overlap`. A good detection setting: resolution
64, max_objects 6, min_scale 0.15, max_scale 0.35.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from cnnlab.data.builders import EmbeddedBuilder
from cnnlab.data.errors import DataError

SUPERSAMPLE = 4  # polygons are drawn at 4x and box-filtered: anti-aliased edges, sub-pixel masks
POSITIONS = ('random', 'center', 'split')
PAD_LABEL = -1  # `labels` after the last object (0 is a class)
MIN_VISIBLE_PIXELS = 4  # a counted object shows at least this many pixels ...
MIN_VISIBLE_FRACTION = 0.25  # ... and this fraction of the pixels it covered when drawn
PLACEMENT_TRIES = 100  # draws of one shape's size, rotation and position before giving up


def _regular(n: int, phase: float = 0.0) -> np.ndarray:
  angles = phase + 2 * np.pi * np.arange(n) / n
  return np.stack([np.cos(angles), np.sin(angles)], 1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
  outer = _regular(2 * points, -np.pi / 2)
  return outer * np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)[:, None]


# Vertices (x, y) of each kind inside the unit circle, pointing "up" before rotation.
SHAPES = {
    'circle': _regular(48),
    'square': _regular(4, np.pi / 4),
    'triangle': _regular(3, -np.pi / 2),
    'star': _star(),
    'pentagon': _regular(5, -np.pi / 2),
    'hexagon': _regular(6),
    'cross': np.array([(-1, -3), (1, -3), (1, -1), (3, -1), (3, 1), (1, 1), (1, 3), (-1, 3),
                       (-1, 1), (-3, 1), (-3, -1), (-1, -1)], float) / np.sqrt(10),
    'diamond': np.array([(0, -1), (0.55, 0), (0, 1), (-0.55, 0)]),
    'arrow': np.array([(0, -1), (0.8, -0.1), (0.3, -0.1), (0.3, 1), (-0.3, 1), (-0.3, -0.1),
                       (-0.8, -0.1)]),
}
SHAPE_NAMES = tuple(SHAPES)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
  """A random background, (size, size, 3) float in [0, 1]: smooth colour noise and stripes."""
  grid = rng.uniform(0, 1, (4, 4, 3))
  noise = np.asarray(
      Image.fromarray(np.uint8(grid * 255)).resize((size, size), Image.Resampling.BICUBIC),
      np.float64) / 255.0
  yy, xx = np.mgrid[0:size, 0:size] / size
  theta = rng.uniform(0, np.pi)
  frequency = rng.uniform(2, 8)  # stripes per image side
  wave = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * (xx * np.cos(theta) + yy * np.sin(theta)))
  stripe_colours = rng.uniform(0, 1, (2, 3))
  stripes = stripe_colours[0] + wave[..., None] * (stripe_colours[1] - stripe_colours[0])
  mix = rng.uniform(0.2, 0.8)
  return mix * noise + (1 - mix) * stripes


def _geometry(rng: np.random.Generator, size: int, min_scale: float, max_scale: float,
              max_rotation: float, x_range: tuple[float, float]) -> tuple[float, ...]:
  """Draws one shape's (radius, angle, cx, cy): radius in pixels (circumscribed), angle in radians,
  centre in pixel-edge coordinates with x within `x_range` (fractions of the side) and the
  circumscribed circle inside the image."""
  radius = rng.uniform(min_scale, max_scale) * size / 2  # circumscribed radius in pixels
  angle = np.deg2rad(rng.uniform(-max_rotation, max_rotation))
  lo_x = max(radius, x_range[0] * size)
  hi_x = max(lo_x, min(size - radius, x_range[1] * size))
  cx = rng.uniform(lo_x, hi_x)
  cy = rng.uniform(radius, size - radius) if x_range != (0.5, 0.5) else size / 2
  return radius, angle, cx, cy


def _coverage(size: int, kind: int, radius: float, angle: float, cx: float,
              cy: float) -> np.ndarray:
  """(size, size) float64 in [0, 1]: the fraction of each pixel inside shape SHAPE_NAMES[kind]
  (drawn at SUPERSAMPLE x and box-filtered)."""
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  outline = SHAPES[SHAPE_NAMES[kind]]
  vertices = outline @ rotation.T * radius + (cx, cy)  # pixel-edge coordinates
  big = Image.new('L', (size * SUPERSAMPLE,) * 2, 0)
  ImageDraw.Draw(big).polygon([tuple(v) for v in vertices * SUPERSAMPLE], fill=255)
  coverage = np.asarray(big, np.float64).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean((1, 3))
  coverage /= 255.0  # (R, R) fraction of each pixel inside the shape
  return coverage


def _paint(rng: np.random.Generator, background: np.ndarray, coverage: np.ndarray,
           reference: np.ndarray) -> np.ndarray:
  """`background` (R, R, 3) float in [0, 1] with one shape of a random colour (vertically shaded)
  blended over it by `coverage` (R, R). The colour is replaced by its complement when it is close
  (L1 < 0.6) to `reference` (3,), the colour the shape must stand out from."""
  size = background.shape[0]
  colour = rng.uniform(0, 1, 3)
  if np.abs(colour - reference).sum() < 0.6:  # keep the shape visible
    colour = 1.0 - colour
  shade = 1.0 + rng.uniform(-0.15, 0.15) * (np.mgrid[0:size, 0:size][0] / size - 0.5)[..., None]
  alpha = coverage[..., None]
  return background * (1 - alpha) + np.clip(colour * shade, 0, 1) * alpha


def render(rng: np.random.Generator, *, resolution: int, label: int, min_scale: float,
           max_scale: float, max_rotation: float, x_range: tuple[float, float],
           kind: int | None = None) -> dict:
  """Draws one example labelled `label` of shape SHAPE_NAMES[kind] (kind None = label); `x_range`
  bounds the centre's x (fraction of the side). The random draws do not depend on the kind."""
  size = resolution
  geometry = _geometry(rng, size, min_scale, max_scale, max_rotation, x_range)
  coverage = _coverage(size, label if kind is None else kind, *geometry)
  background = _texture(rng, size)
  image = _paint(rng, background, coverage, background.mean((0, 1)))

  inside = coverage >= 0.5
  if not inside.any():  # a shape under one pixel: mark the pixel it covers most
    inside = coverage == coverage.max()
  rows, cols = np.nonzero(inside)
  bbox = np.array([rows.min(), cols.min(), rows.max() + 1, cols.max() + 1], np.float32) / size
  return {
      'image': np.round(image * 255).astype(np.uint8),
      'label': label,
      'mask': (inside * (label + 1)).astype(np.uint8),
      'bbox': bbox,
  }


def instance_boxes(instances: np.ndarray, count: int) -> np.ndarray:
  """(count, 4) float32 (ymin, xmin, ymax, xmax) in [0, 1] (pixel edges over the side): the tight
  box of the pixels of each instance id 1..count in `instances` (R, R); zeros for an absent id."""
  size = instances.shape[0]
  ids = np.arange(1, count + 1)
  member = instances[None] == ids[:, None, None]  # (count, R, R)
  rows, cols = member.any(2), member.any(1)  # (count, R)
  boxes = np.stack([rows.argmax(1), cols.argmax(1), size - rows[:, ::-1].argmax(1),
                    size - cols[:, ::-1].argmax(1)], 1).astype(np.float32) / size
  return np.where(rows.any(1)[:, None], boxes, np.float32(0))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(n, m) intersection over union of boxes a (n, 4) and b (m, 4), (ymin, xmin, ymax, xmax)."""
  top_left = np.maximum(a[:, None, :2], b[None, :, :2])
  bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(bottom_right - top_left, 0, None), -1)
  area = lambda x: np.prod(x[:, 2:] - x[:, :2], -1)
  union = area(a)[:, None] + area(b)[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _visible_enough(visible: np.ndarray, drawn: np.ndarray) -> np.ndarray:
  """Which objects keep enough of themselves: >= MIN_VISIBLE_PIXELS pixels and
  >= MIN_VISIBLE_FRACTION of the pixels they covered when drawn."""
  return (visible >= MIN_VISIBLE_PIXELS) & (visible >= MIN_VISIBLE_FRACTION * drawn)


def pad_objects(labels, boxes, max_objects: int, where: str = '') -> dict[str, np.ndarray]:
  """The padded object features: labels (N,) int32 (PAD_LABEL after the objects), boxes (N, 4)
  float32 (zeros after the objects) and num_objects () int32, N = max_objects. DataError naming
  N when there are more objects than that."""
  count = len(labels)
  if count > max_objects:
    raise DataError(f'{where}{count} objects, more than max_objects={max_objects} (N, the '
                    'padded object count of every example)')
  padded_labels = np.full((max_objects,), PAD_LABEL, np.int32)
  padded_labels[:count] = labels
  padded_boxes = np.zeros((max_objects, 4), np.float32)
  padded_boxes[:count] = np.asarray(boxes, np.float32).reshape(count, 4)
  return {'labels': padded_labels, 'boxes': padded_boxes, 'num_objects': np.int32(count)}


def render_objects(rng: np.random.Generator, *, resolution: int, num_classes: int,
                   first_kind: int, min_objects: int, max_objects: int, max_overlap: float,
                   min_scale: float, max_scale: float, max_rotation: float,
                   x_range: tuple[float, float], where: str = '') -> dict:
  """Draws one multi-object example: between min_objects and max_objects shapes (the count
  uniform), each of a uniformly random label, size, rotation and position, later ones over earlier
  ones, on one texture. Features as in `Shapes` with max_objects = N >= 1.

  Placement: a shape is re-drawn (new size, rotation and position from the same stream, at most
  PLACEMENT_TRIES times) until, with it drawn, every object keeps >= MIN_VISIBLE_PIXELS pixels and
  >= MIN_VISIBLE_FRACTION of those it covered when drawn, and every two objects' visible boxes
  overlap by an IoU <= max_overlap. DataError naming the settings when no try succeeds.
  """
  size = resolution
  count = int(rng.integers(min_objects, max_objects + 1))
  canvas = _texture(rng, size)
  instances = np.zeros((size, size), np.uint8)  # 0 = background, i + 1 = object i (top-most)
  labels, drawn = [], []  # per object: its label, and the pixels it covered when drawn
  for i in range(count):
    label = int(rng.integers(num_classes))
    for _ in range(PLACEMENT_TRIES):
      geometry = _geometry(rng, size, min_scale, max_scale, max_rotation, x_range)
      coverage = _coverage(size, first_kind + label, *geometry)
      inside = coverage >= 0.5
      trial = np.where(inside, np.uint8(i + 1), instances)
      visible = np.bincount(trial.ravel(), minlength=i + 2)[1:i + 2]
      if not _visible_enough(visible, np.array([*drawn, inside.sum()])).all():
        continue
      boxes = instance_boxes(trial, i + 1)
      if (np.triu(box_iou(boxes, boxes), 1) <= max_overlap).all():
        break
    else:
      raise DataError(
          f'{where}cannot place shape {i + 1} of {count} (max_objects={max_objects}) in '
          f'{PLACEMENT_TRIES} tries: every shape needs >= {MIN_VISIBLE_PIXELS} visible pixels '
          f'and {MIN_VISIBLE_FRACTION:.0%} of its drawn ones, and two boxes may overlap by an '
          f'IoU of at most max_overlap={max_overlap}. Lower max_objects (or max_scale='
          f'{max_scale}), raise max_overlap, or raise min_scale={min_scale} at resolution='
          f'{resolution} if the shapes are too small to see')
    # The colour stands out from what the shape covers (texture and earlier shapes).
    weights = coverage / coverage.sum()
    canvas = _paint(rng, canvas, coverage, np.einsum('hw,hwc->c', weights, canvas))
    instances = trial
    labels.append(label)
    drawn.append(int(inside.sum()))
  lookup = np.array([0, *(k + 1 for k in labels)], np.uint8)  # instance id -> mask value
  return {
      'image': np.round(canvas * 255).astype(np.uint8),
      **pad_objects(labels, instance_boxes(instances, count), max_objects, where),
      'mask': lookup[instances],
      'instances': instances,
  }


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """A builder config carrying every setting, so a pickled builder rebuilds the same dataset."""

  params: dict = dataclasses.field(default_factory=dict)


class Shapes(EmbeddedBuilder):
  """Coloured geometric shapes at random positions, scales and rotations on textured backgrounds.

  Each example has `label`, a per-pixel `mask` (0 background, label + 1 shape) and a `bbox`; with
  max_objects = N >= 1, several shapes with `labels`, `boxes`, `num_objects`, `mask` and
  `instances` instead (module docstring). Deterministic from the builder settings; each setting
  combination is its own builder config.
  """

  name = 'shapes'
  VERSION = tfds.core.Version('1.0.0')
  HAS_MASK = True

  def __init__(self, *, config: 'ShapesConfig | None' = None, resolution: int = 64,
               num_classes: int = 4, num_train: int = 10_000, num_test: int = 2_000,
               dataset_seed: int = 0, min_scale: float = 0.3, max_scale: float = 0.6,
               max_rotation: float = 180.0, position: str = 'random', first_kind: int = 0,
               max_objects: int = 0, min_objects: int = 1, max_overlap: float = 0.3, **kwargs):
    if config is None:  # (TFDS passes `config` back when it unpickles a builder in a worker)
      params = dict(resolution=int(resolution), num_classes=int(num_classes),
                    num_train=int(num_train), num_test=int(num_test),
                    dataset_seed=int(dataset_seed), min_scale=float(min_scale),
                    max_scale=float(max_scale), max_rotation=float(max_rotation),
                    position=str(position))
      if first_kind:  # only when set: the default datasets keep their names, digests and caches
        params['first_kind'] = int(first_kind)
      if max_objects:  # likewise; min_objects and max_overlap only matter with several objects
        params.update(max_objects=int(max_objects), min_objects=int(min_objects),
                      max_overlap=float(max_overlap))
      check_params(params)
      config = ShapesConfig(name=config_name(params), params=params)
    self._params = dict(config.params)
    self.NUM_CLASSES = self._params['num_classes']
    super().__init__(config=config, **kwargs)

  @property
  def image_shape(self):
    return (self._params['resolution'],) * 2 + (3,)

  @property
  def max_objects(self) -> int:
    return self._params.get('max_objects', 0)

  def params(self):
    return dict(self._params)

  def class_names(self):
    first = self._params.get('first_kind', 0)
    return SHAPE_NAMES[first:first + self.NUM_CLASSES]

  def _examples(self, split):
    p = self._params
    count = p['num_train'] if split == 'train' else p['num_test']
    x_range = {'random': (0.0, 1.0), 'center': (0.5, 0.5),
               'split': (0.0, 0.5) if split == 'train' else (0.5, 1.0)}[p['position']]
    first = p.get('first_kind', 0)
    for index in range(count):
      # Independent stream per example: generation order and count never change an example.
      rng = np.random.default_rng([p['dataset_seed'], self.SPLITS.index(split), index])
      if self.max_objects:
        yield render_objects(
            rng, resolution=p['resolution'], num_classes=p['num_classes'], first_kind=first,
            min_objects=p['min_objects'], max_objects=p['max_objects'],
            max_overlap=p['max_overlap'], min_scale=p['min_scale'], max_scale=p['max_scale'],
            max_rotation=p['max_rotation'], x_range=x_range,
            where=f'shapes {self.builder_config.name} {split} example {index}: ')
        continue
      label = index % p['num_classes']
      yield render(rng, resolution=p['resolution'], label=label, kind=first + label,
                   min_scale=p['min_scale'], max_scale=p['max_scale'],
                   max_rotation=p['max_rotation'], x_range=x_range)


def check_params(p: dict) -> None:
  """Raises DataError naming the first invalid `shapes` setting."""
  problems = []
  if p['resolution'] < 8:
    problems.append(f"resolution={p['resolution']} (need >= 8 pixels)")
  first = p.get('first_kind', 0)
  if not 1 <= p['num_classes'] <= len(SHAPE_NAMES):
    problems.append(f"num_classes={p['num_classes']} (need 1..{len(SHAPE_NAMES)}: "
                    f"{', '.join(SHAPE_NAMES)})")
  elif not 0 <= first <= len(SHAPE_NAMES) - p['num_classes']:
    problems.append(f"first_kind={first} with num_classes={p['num_classes']} (need 0.."
                    f"{len(SHAPE_NAMES) - p['num_classes']}: the kinds are SHAPE_NAMES[first_kind:"
                    f"first_kind + num_classes] of {', '.join(SHAPE_NAMES)})")
  if p['num_train'] < 1 or p['num_test'] < 1:
    problems.append(f"num_train={p['num_train']}, num_test={p['num_test']} (need >= 1)")
  if not 0 < p['min_scale'] <= p['max_scale'] <= 1:
    problems.append(f"min_scale={p['min_scale']}, max_scale={p['max_scale']} "
                    '(need 0 < min_scale <= max_scale <= 1)')
  if p['position'] not in POSITIONS:
    problems.append(f"position={p['position']!r} (need one of {POSITIONS})")
  objects = p.get('max_objects', 0)
  if not 0 <= objects <= 255:
    problems.append(f'max_objects={objects} (need 0..255: instance ids are uint8; 0 = one shape '
                    'per image with `label` and `bbox`)')
  elif objects:
    if not 0 <= p['min_objects'] <= objects:
      problems.append(f"min_objects={p['min_objects']} with max_objects={objects} (need 0 <= "
                      'min_objects <= max_objects)')
    if not 0 <= p['max_overlap'] <= 1:
      problems.append(f"max_overlap={p['max_overlap']} (need an IoU in [0, 1])")
    if objects > 1 and p['position'] == 'center':
      problems.append(f"position='center' with max_objects={objects} (every shape would be "
                      "centred on the same point: use 'random' or 'split')")
  if problems:
    raise DataError('invalid shapes setting: ' + '; '.join(problems))


def config_name(p: dict) -> str:
  """A readable, unique directory name for one combination of settings.

  `first_kind` and `max_objects` (with `min_objects`, `max_overlap`) are in `p` only when they
  are not 0, so the datasets made before they existed keep their names
  (`r64_c4_n10000_2000_f0ec1725`) and other kinds or object counts get their own
  (`r32_c5k4_n...`, `r64_c4_o1-6_n...`).
  """
  digest = hashlib.sha1(json.dumps(p, sort_keys=True).encode()).hexdigest()[:8]
  kinds = f"c{p['num_classes']}" + (f"k{p['first_kind']}" if p.get('first_kind') else '')
  if p.get('max_objects'):
    kinds += f"_o{p['min_objects']}-{p['max_objects']}"
  return f"r{p['resolution']}_{kinds}_n{p['num_train']}_{p['num_test']}_{digest}"
