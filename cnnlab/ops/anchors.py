"""Anchor boxes as torchvision's AnchorGenerator makes them (torchvision.models.detection.
anchor_utils), for static grid sizes: plain numpy, computed once when a model is traced, and a
constant of the compiled program.

Boxes are (ymin, xmin, ymax, xmax) in input-image pixels, float32. An aspect ratio is height /
width. A level's base anchors are ratio-major (every size of the first ratio, then the next
ratio), each centred on 0 and rounded half to even (torch.round); a feature map's anchors are those
base anchors shifted to every location, locations row-major, a location's anchors together:
anchor a of location (i, j) is row (i * w + j) * A + a, with A = len(sizes) * len(ratios). A
location's shift is (i * sy, j * sx), with stride (sy, sx) = image size // feature size: the
top-left corner of its cell, not the centre, as in torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _pair(name: str, value) -> tuple[int, int]:
  pair = tuple(value) if isinstance(value, (tuple, list)) else None
  if (pair is None or len(pair) != 2 or not all(isinstance(v, (int, np.integer)) for v in pair)
      or min(pair) < 1):
    raise ValueError(f'{name} must be a pair of positive ints (height, width), got {value!r}')
  return int(pair[0]), int(pair[1])


def _levels(sizes, aspect_ratios) -> tuple[list[tuple], list[tuple]]:
  """Sizes and ratios per level, as AnchorGenerator reads them: a flat sequence of sizes is one
  size per level, a flat sequence of ratios is every level's."""
  sizes = [tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in sizes]
  if len(aspect_ratios) and not isinstance(aspect_ratios[0], (tuple, list)):
    aspect_ratios = [tuple(aspect_ratios)] * len(sizes)
  if not sizes or len(aspect_ratios) != len(sizes):
    raise ValueError(f'need sizes and aspect ratios for one level or more, the same number of '
                     f'levels, got sizes={sizes!r} and aspect_ratios={aspect_ratios!r}')
  return sizes, [tuple(r) for r in aspect_ratios]


def base_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
  """(len(aspect_ratios) * len(sizes), 4) anchors centred on 0 (AnchorGenerator.generate_anchors):
  a size s and ratio r make a box s * sqrt(r) high and s / sqrt(r) wide, rounded."""
  sizes, ratios = np.asarray(sizes, np.float32), np.asarray(aspect_ratios, np.float32)
  if sizes.ndim != 1 or sizes.size == 0 or not np.all(sizes > 0):
    raise ValueError(f'sizes must be a non-empty sequence of positive numbers, got {sizes}')
  if ratios.ndim != 1 or ratios.size == 0 or not np.all(ratios > 0):
    raise ValueError(
        f'aspect_ratios must be a non-empty sequence of positive numbers, got {aspect_ratios}')
  h_ratios = np.sqrt(ratios)
  w_ratios = np.float32(1) / h_ratios
  ws = (w_ratios[:, None] * sizes[None, :]).reshape(-1)
  hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
  return np.round(np.stack([-hs, -ws, hs, ws], axis=1) / np.float32(2))


def grid_anchors(feature_size: tuple[int, int], stride: tuple[int, int],
                 base: np.ndarray) -> np.ndarray:
  """(h * w * A, 4): the A `base` anchors at every location of an (h, w) feature map whose cells
  are `stride` (sy, sx) pixels apart (AnchorGenerator.grid_anchors)."""
  (h, w), (sy, sx) = _pair('feature_size', feature_size), _pair('stride', stride)
  base = np.asarray(base, np.float32)
  if base.ndim != 2 or base.shape[1] != 4:
    raise ValueError(f'base must have shape (A, 4), got {base.shape}')
  shift_y, shift_x = np.meshgrid(np.arange(h) * sy, np.arange(w) * sx, indexing='ij')
  shifts = np.stack([shift_y, shift_x, shift_y, shift_x], axis=-1).reshape(-1, 1, 4)
  return (shifts.astype(np.float32) + base[None]).reshape(-1, 4)


def generate_anchors(image_size: tuple[int, int], feature_sizes: Sequence[tuple[int, int]],
                     sizes: Sequence[Sequence[float]],
                     aspect_ratios: Sequence[float] | Sequence[Sequence[float]] = (0.5, 1.0, 2.0),
                     ) -> np.ndarray:
  """(sum over levels of h * w * A, 4): the anchors of one image of `image_size` (H, W) whose
  feature maps (one per level, e.g. FPN's) have `feature_sizes`, levels in order, as
  AnchorGenerator(sizes, aspect_ratios)(images, feature_maps) gives them for each image.

  `sizes` has one sequence of sizes per level; `aspect_ratios` is one sequence per level or a
  single sequence of ratios that every level uses. Level l's stride is image_size //
  feature_sizes[l]."""
  image_h, image_w = _pair('image_size', image_size)
  feature_sizes = [_pair('feature_sizes[i]', f) for f in feature_sizes]
  sizes, aspect_ratios = _levels(sizes, aspect_ratios)
  if len(feature_sizes) != len(sizes):
    raise ValueError(f'need one feature size per level, got {len(feature_sizes)} feature_sizes '
                     f'for {len(sizes)} levels of sizes')
  return np.concatenate([
      grid_anchors((h, w), (image_h // h, image_w // w), base_anchors(s, r))
      for (h, w), s, r in zip(feature_sizes, sizes, aspect_ratios)], axis=0)


def num_anchors_per_location(sizes: Sequence[Sequence[float]],
                             aspect_ratios: Sequence[float] | Sequence[Sequence[float]]
                             = (0.5, 1.0, 2.0)) -> list[int]:
  """A per level, as AnchorGenerator.num_anchors_per_location: the RPN head's output width."""
  sizes, aspect_ratios = _levels(sizes, aspect_ratios)
  return [len(s) * len(r) for s, r in zip(sizes, aspect_ratios)]


__all__ = ['base_anchors', 'grid_anchors', 'generate_anchors', 'num_anchors_per_location']
