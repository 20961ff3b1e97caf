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


def render(rng: np.random.Generator, *, resolution: int, label: int, min_scale: float,
           max_scale: float, max_rotation: float, x_range: tuple[float, float],
           kind: int | None = None) -> dict:
  """Draws one example labelled `label` of shape SHAPE_NAMES[kind] (kind None = label); `x_range`
  bounds the centre's x (fraction of the side). The random draws do not depend on the kind."""
  size = resolution
  radius = rng.uniform(min_scale, max_scale) * size / 2  # circumscribed radius in pixels
  angle = np.deg2rad(rng.uniform(-max_rotation, max_rotation))
  lo_x = max(radius, x_range[0] * size)
  hi_x = max(lo_x, min(size - radius, x_range[1] * size))
  cx = rng.uniform(lo_x, hi_x)
  cy = rng.uniform(radius, size - radius) if x_range != (0.5, 0.5) else size / 2
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  outline = SHAPES[SHAPE_NAMES[label if kind is None else kind]]
  vertices = outline @ rotation.T * radius + (cx, cy)  # pixel-edge coordinates

  big = Image.new('L', (size * SUPERSAMPLE,) * 2, 0)
  ImageDraw.Draw(big).polygon([tuple(v) for v in vertices * SUPERSAMPLE], fill=255)
  coverage = np.asarray(big, np.float64).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean((1, 3))
  coverage /= 255.0  # (R, R) fraction of each pixel inside the shape

  background = _texture(rng, size)
  colour = rng.uniform(0, 1, 3)
  if np.abs(colour - background.mean((0, 1))).sum() < 0.6:  # keep the shape visible
    colour = 1.0 - colour
  shade = 1.0 + rng.uniform(-0.15, 0.15) * (np.mgrid[0:size, 0:size][0] / size - 0.5)[..., None]
  alpha = coverage[..., None]
  image = background * (1 - alpha) + np.clip(colour * shade, 0, 1) * alpha

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


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """A builder config carrying every setting, so a pickled builder rebuilds the same dataset."""

  params: dict = dataclasses.field(default_factory=dict)


class Shapes(EmbeddedBuilder):
  """Coloured geometric shapes at random positions, scales and rotations on textured backgrounds.

  Each example has `label`, a per-pixel `mask` (0 background, label + 1 shape) and a `bbox`.
  Deterministic from the builder settings; each setting combination is its own builder config.
  """

  name = 'shapes'
  VERSION = tfds.core.Version('1.0.0')
  HAS_MASK = True

  def __init__(self, *, config: 'ShapesConfig | None' = None, resolution: int = 64,
               num_classes: int = 4, num_train: int = 10_000, num_test: int = 2_000,
               dataset_seed: int = 0, min_scale: float = 0.3, max_scale: float = 0.6,
               max_rotation: float = 180.0, position: str = 'random', first_kind: int = 0,
               **kwargs):
    if config is None:  # (TFDS passes `config` back when it unpickles a builder in a worker)
      params = dict(resolution=int(resolution), num_classes=int(num_classes),
                    num_train=int(num_train), num_test=int(num_test),
                    dataset_seed=int(dataset_seed), min_scale=float(min_scale),
                    max_scale=float(max_scale), max_rotation=float(max_rotation),
                    position=str(position))
      if first_kind:  # only when set: the default datasets keep their names, digests and caches
        params['first_kind'] = int(first_kind)
      check_params(params)
      config = ShapesConfig(name=config_name(params), params=params)
    self._params = dict(config.params)
    self.NUM_CLASSES = self._params['num_classes']
    super().__init__(config=config, **kwargs)

  @property
  def image_shape(self):
    return (self._params['resolution'],) * 2 + (3,)

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
  if problems:
    raise DataError('invalid shapes setting: ' + '; '.join(problems))


def config_name(p: dict) -> str:
  """A readable, unique directory name for one combination of settings.

  `first_kind` is in `p` only when it is not 0, so the datasets made before it existed keep their
  names (`r64_c4_n10000_2000_f0ec1725`) and other kinds get their own (`r32_c5k4_n...`).
  """
  digest = hashlib.sha1(json.dumps(p, sort_keys=True).encode()).hexdigest()[:8]
  kinds = f"c{p['num_classes']}" + (f"k{p['first_kind']}" if p.get('first_kind') else '')
  return f"r{p['resolution']}_{kinds}_n{p['num_train']}_{p['num_test']}_{digest}"
