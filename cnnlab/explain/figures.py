"""Figures a person reads at a glance: attribution grids (image, heat-map overlay, true and
predicted class with probability), filters, feature maps, top activations, receptive fields.

matplotlib's object API on the Agg canvas (no pyplot, no global backend), as cnnlab.runs.
Images are the uint8 (N, H, W, C) pictures as stored, not the normalised model input.

`filters_mosaic` and `attribution_mosaic` compose the same tiles as arrays (uint8 (H, W, 3)), with
no figure to draw: a training run's log.images writes them into TensorBoard at every evaluation,
where a matplotlib figure would cost about as much as the evaluation itself.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from cnnlab.runs import figure


def _finish(fig, out: str, title: str = '', rows: int = 1) -> str:
  """Title, layout, write OUT. The grids' panels have no axes, so fixed margins lay them out
  (tight_layout measured every panel: seconds for a 64-panel grid): room for the title on top
  and for a one-line caption above each of `rows` rows."""
  width, height = fig.get_size_inches()
  if title:
    fig.suptitle(title, fontsize=9, y=1 - 0.08 / height, va='top')
  top = 1 - (0.45 if title else 0.25) / height
  row = (top - 0.02) * height / rows  # inches per row, caption included
  fig.subplots_adjust(left=0.1 / width, right=1 - 0.1 / width, bottom=0.02, top=top,
                      wspace=0.08, hspace=0.25 / max(row - 0.25, 0.1))
  fig.savefig(out)
  return out


def display(image: np.ndarray) -> tuple[np.ndarray, str | None]:
  """(H, W, C) -> what imshow takes and its colormap: grayscale for one channel, else RGB (the
  first three channels) scaled to 0..1."""
  image = np.asarray(image)
  image = image.astype(np.float64) / 255.0 if image.dtype == np.uint8 else _unit(image)
  return (image[..., 0], 'gray') if image.shape[-1] == 1 else (image[..., :3], None)


def _unit(x: np.ndarray) -> np.ndarray:
  """Min-max scaled to 0..1 (constant arrays: 0.5)."""
  x = np.asarray(x, np.float64)
  span = x.max() - x.min()
  return np.full_like(x, 0.5) if span == 0 else (x - x.min()) / span


def _centred(x: np.ndarray) -> np.ndarray:
  """Signed values to 0..1 with 0 at 0.5 (the deconvnet's projections, as Zeiler & Fergus show)."""
  x = np.asarray(x, np.float64)
  scale = np.abs(x).max()
  return np.full_like(x, 0.5) if scale == 0 else 0.5 + x / (2 * scale)


def overlay(picture: np.ndarray, heat: np.ndarray, signed: bool) -> np.ndarray:
  """(H, W, 3) in 0..1: the (H, W) gray picture in 0..1 under the (H, W) heat map at 60% opacity:
  a diverging map (red for, blue against, symmetric about 0) when `signed`, else 'inferno' from 0
  to the map's maximum."""
  from matplotlib import colormaps
  heat = np.asarray(heat, np.float64)
  if signed:
    limit = np.abs(heat).max() or 1.0
    colours = colormaps['bwr']((heat + limit) / (2 * limit))[..., :3]
  else:
    colours = colormaps['inferno'](heat / (heat.max() or 1.0))[..., :3]
  return 0.4 * np.asarray(picture, np.float64)[..., None] + 0.6 * colours


def heatmap(attributions: np.ndarray, signed: bool) -> np.ndarray:
  """(B, H, W, C) -> (B, H, W): the channels' sum when signed, else their largest magnitude."""
  a = np.asarray(attributions, np.float64)
  return a.sum(-1) if signed else np.abs(a).max(-1)


def _caption(label, predicted, probability) -> tuple[str, str]:
  """'true 7  pred 7 (99%)' and its colour: green when right, red when wrong, black unknown."""
  true = '?' if label is None or label < 0 else str(int(label))
  text = f'true {true}  pred {int(predicted)} ({100 * probability:.0f}%)'
  colour = 'black' if true == '?' else ('tab:green' if int(label) == int(predicted) else 'tab:red')
  return text, colour


def attribution_grid(images: np.ndarray, maps: np.ndarray, out: str, *, signed: bool,
                     labels: Sequence | None, predicted: Sequence, probability: Sequence,
                     title: str = '', columns: int = 4) -> str:
  """OUT: per example the image (captioned with the true class, the predicted class and its
  probability; green when right, red when wrong) and the heat map (B, H, W) over it: a diverging
  map (red for, blue against) when `signed`, else 'inferno' from 0."""
  n = len(images)
  columns = min(columns, n)
  rows = math.ceil(n / columns)
  fig = figure(2 * columns * 1.7, rows * 1.9 + 0.4)
  for k in range(n):
    picture, cmap = display(images[k])
    gray = picture if cmap else picture.mean(-1)
    text, colour = _caption(None if labels is None else labels[k], predicted[k], probability[k])
    ax = fig.add_subplot(rows, 2 * columns, 2 * k + 1)
    ax.imshow(picture, cmap=cmap, vmin=0, vmax=1)
    ax.set_title(text, fontsize=7, color=colour)
    ax.axis('off')
    ax = fig.add_subplot(rows, 2 * columns, 2 * k + 2)
    ax.imshow(overlay(gray, maps[k], signed))
    ax.axis('off')
  return _finish(fig, out, title, rows)


# A frame's colour: the prediction right, wrong, or not known (tab:green, tab:red, gray).
FRAME = {True: (0.17, 0.63, 0.17), False: (0.84, 0.15, 0.16), None: (0.5, 0.5, 0.5)}


def attribution_mosaic(images: np.ndarray, maps: np.ndarray, *, signed: bool,
                       correct: Sequence | None = None, columns: int = 4,
                       tile: int = 96) -> np.ndarray:
  """`attribution_grid` as one uint8 (H, W, 3) array: per example the picture and the heat map
  over it (`overlay`), side by side, each enlarged by the whole factor s = ceil(tile / max(h, w))
  (nearest neighbour) and framed by FRAME colours: a 2-pixel frame around and between the two,
  green when correct[k], red when not, gray without `correct`. Examples are laid out as
  `filters_mosaic`'s tiles, with 2-pixel white gaps: example k at row k // columns' and column
  k % columns' (columns' = min(columns, N)), each (h * s + 4) x (2 * w * s + 6) with its frame; the
  picture's top-left pixel at (2, 2) of it, the heat map's at (2, w * s + 4)."""
  n, h, w = len(images), *np.shape(images)[1:3]
  s = math.ceil(tile / max(h, w))
  up = lambda x: np.kron(x, np.ones((s, s, 1)))  # noqa: E731
  tiles = np.empty((n, h * s + 4, 2 * w * s + 6, 3))
  for k in range(n):
    picture, cmap = display(images[k])
    gray = picture if cmap else picture.mean(-1)
    tiles[k] = FRAME[None if correct is None else bool(correct[k])]
    tiles[k, 2:-2, 2:2 + w * s] = up(np.repeat(gray[..., None], 3, -1) if cmap else picture)
    tiles[k, 2:-2, w * s + 4:-2] = up(overlay(gray, maps[k], signed))
  return _mosaic(tiles, columns, gap=2, fill=1.0)


def _mosaic(tiles: np.ndarray, columns: int, *, gap: int, fill: float) -> np.ndarray:
  """(N, h, w, 3) tiles in 0..1 -> uint8 in rows of min(columns, N), `gap` pixels of `fill`
  around and between them: (gap + rows * (h + gap), gap + columns * (w + gap), 3)."""
  n, h, w = tiles.shape[:3]
  columns = min(columns, n)
  rows = math.ceil(n / columns)
  out = np.full((gap + rows * (h + gap), gap + columns * (w + gap), 3), fill)
  for k in range(n):
    top, left = gap + (k // columns) * (h + gap), gap + (k % columns) * (w + gap)
    out[top:top + h, left:left + w] = tiles[k]
  return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


def _filter_tile(w: np.ndarray) -> np.ndarray:
  """One (kh, kw, C_in) filter as a picture in 0..1, min-max scaled on its own: (kh, kw, 3) in
  colour for 3 input channels, else (kh, kw) their mean in gray (what one filter is tuned to
  matters, not how its scale compares with its neighbours')."""
  w = np.asarray(w, np.float64)
  return _unit(w) if w.shape[-1] == 3 else _unit(w.mean(-1))


def filters_grid(kernel: np.ndarray, out: str, *, title: str = '', limit: int = 64) -> str:
  """OUT: the first `limit` filters of a (kh, kw, C_in, C_out) kernel, each min-max scaled:
  in colour for 3 input channels, else their mean over input channels in gray."""
  kernel = np.asarray(kernel, np.float64)
  count = min(limit, kernel.shape[-1])
  columns = min(count, 8)
  rows = math.ceil(count / columns)
  fig = figure(columns * 1.0 + 0.2, rows * 1.0 + 0.6)
  for k in range(count):
    tile = _filter_tile(kernel[..., k])
    ax = fig.add_subplot(rows, columns, k + 1)
    ax.imshow(tile, cmap=None if tile.ndim == 3 else 'gray', vmin=0, vmax=1,
              interpolation='nearest')
    ax.set_title(str(k), fontsize=6)
    ax.axis('off')
  note = '' if kernel.shape[2] == 3 else f' (mean over {kernel.shape[2]} input channels)'
  return _finish(fig, out, f'{title}{note}', rows)


def filters_mosaic(kernel: np.ndarray, *, limit: int = 64, columns: int = 8,
                   tile: int = 24) -> np.ndarray:
  """`filters_grid` as one uint8 (H, W, 3) array: the first `limit` filters' tiles, each enlarged
  by the whole factor s = ceil(tile / max(kh, kw)) (nearest neighbour: every weight one block),
  in rows of columns' = min(columns, count) with 1-pixel gray lines around them:
  H = 1 + rows * (kh * s + 1), W = 1 + columns' * (kw * s + 1)."""
  kernel = np.asarray(kernel, np.float64)
  kh, kw = kernel.shape[:2]
  s = math.ceil(tile / max(kh, kw))
  tiles = []
  for k in range(min(limit, kernel.shape[-1])):
    picture = _filter_tile(kernel[..., k])
    picture = picture if picture.ndim == 3 else np.repeat(picture[..., None], 3, -1)
    tiles.append(np.kron(picture, np.ones((s, s, 1))))
  return _mosaic(np.stack(tiles), columns, gap=1, fill=0.5)


def feature_maps_grid(image: np.ndarray, maps: np.ndarray, out: str, *, title: str = '',
                      limit: int = 63) -> str:
  """OUT: the image, then its first `limit` channels of an (h, w, C) feature map, each on its
  own scale (the channel's maximum noted)."""
  maps = np.asarray(maps, np.float64)
  count = min(limit, maps.shape[-1])
  columns = min(count + 1, 8)
  rows = math.ceil((count + 1) / columns)
  fig = figure(columns * 1.1 + 0.2, rows * 1.15 + 0.5)
  ax = fig.add_subplot(rows, columns, 1)
  picture, cmap = display(image)
  ax.imshow(picture, cmap=cmap, vmin=0, vmax=1)
  ax.set_title('input', fontsize=6)
  ax.axis('off')
  for k in range(count):
    ax = fig.add_subplot(rows, columns, k + 2)
    ax.imshow(maps[..., k], cmap='viridis', interpolation='nearest')
    ax.set_title(f'{k}: max {maps[..., k].max():.2g}', fontsize=6)
    ax.axis('off')
  return _finish(fig, out, title, rows)


def _box(ax, box, **style) -> None:
  from matplotlib.patches import Rectangle
  top, left, bottom, right = box
  ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left + 1, bottom - top + 1,
                         fill=False, **style))


def top_activations_figure(top, out: str) -> str:
  """OUT: one row per example (strongest first): the image with the unit's receptive field
  boxed, the patch it sees, and the deconvnet projection of that unit on the same patch."""
  k = len(top.index)
  fig = figure(6.0, 1.8 * k + 0.5)
  for row in range(k):
    picture, cmap = display(top.images[row])
    ax = fig.add_subplot(k, 3, 3 * row + 1)
    ax.imshow(picture, cmap=cmap, vmin=0, vmax=1)
    _box(ax, top.boxes[row], edgecolor='yellow', linewidth=1.5)
    ax.set_xlim(-0.5, picture.shape[1] - 0.5)
    ax.set_ylim(picture.shape[0] - 0.5, -0.5)
    label = '' if top.label is None else f', label {int(top.label[row])}'
    ax.set_title(f'#{int(top.index[row])}{label}: {top.value[row]:.3g} at '
                 f'{tuple(int(v) for v in top.position[row])}', fontsize=7)
    ax.axis('off')
    ax = fig.add_subplot(k, 3, 3 * row + 2)
    patch, cmap = display(top.patches[row])
    ax.imshow(patch, cmap=cmap, vmin=0, vmax=1, interpolation='nearest')
    ax.set_title('receptive field', fontsize=7)
    ax.axis('off')
    ax = fig.add_subplot(k, 3, 3 * row + 3)
    projection = _centred(top.projection_patches[row])
    ax.imshow(projection[..., 0] if projection.shape[-1] == 1 else projection[..., :3],
              cmap='gray' if projection.shape[-1] == 1 else None, vmin=0, vmax=1,
              interpolation='nearest')
    ax.set_title('deconvnet projection', fontsize=7)
    ax.axis('off')
  size = 'x'.join(f'{f.size:g}' for f in top.field)
  return _finish(fig, out, f'{top.layer} channel {top.channel}: top {k} (receptive field {size})',
                 k)


def receptive_field_figure(field_map, out: str) -> str:
  """OUT: the unit's mean |gradient| over the input (its empirical receptive field), the analytic
  box (dashed) and the box around the nonzero gradient (solid) on top."""
  fig = figure(4.6, 4.4)
  ax = fig.add_subplot(1, 1, 1)
  gradient = field_map.gradient
  ax.imshow(gradient, cmap='magma', interpolation='nearest')
  _box(ax, field_map.box, edgecolor='cyan', linewidth=1.5, linestyle='--', label='analytic')
  if field_map.support is not None:
    _box(ax, field_map.support, edgecolor='white', linewidth=1.0, label='gradient > 0')
  ax.set_xlim(-0.5, gradient.shape[1] - 0.5)
  ax.set_ylim(gradient.shape[0] - 0.5, -0.5)
  ax.legend(fontsize=7, loc='lower right')
  size = 'x'.join(f'{f.size:g}' for f in field_map.field)
  ax.set_title(f'{field_map.layer} unit {field_map.position}: receptive field {size}', fontsize=9)
  fig.tight_layout()  # one panel, with ticks
  fig.savefig(out)
  return out


__all__ = ['FRAME', 'display', 'overlay', 'heatmap', 'attribution_grid', 'attribution_mosaic',
           'filters_grid', 'filters_mosaic', 'feature_maps_grid', 'top_activations_figure',
           'receptive_field_figure']
