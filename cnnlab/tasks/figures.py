"""Drawing for the tasks' panels (matplotlib, off-screen): a grid of examples by columns, class
masks as colour overlays, boxes as rectangles. A task decides what goes in each column."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

# Where a panel stops: more examples make the picture unreadable, not more informative.
MAX_ROWS = 8


def class_name(k: int, names: Sequence[str] | None) -> str:
  return names[k] if names is not None and 0 <= k < len(names) else str(k)


def as_rgb(image: np.ndarray) -> np.ndarray:
  """(H, W, C) uint8 or 0..1 float -> (H, W, 3) float in [0, 1] (grey images repeated)."""
  image = np.asarray(image)
  image = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
  image = np.clip(image, 0.0, 1.0)
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]


def palette(k: int) -> np.ndarray:
  """(k, 3) colours in [0, 1]; class 0 (background) is black."""
  import matplotlib
  colours = np.asarray(matplotlib.colormaps['tab10'](np.arange(max(k - 1, 1)) % 10))[:, :3]
  return np.concatenate([np.zeros((1, 3)), colours])[:k]


def overlay(image: np.ndarray, mask: np.ndarray, k: int, alpha: float = 0.55) -> np.ndarray:
  """The image with each non-background pixel of `mask` (H, W) tinted by its class colour."""
  rgb = as_rgb(image)
  colours = palette(max(k, int(mask.max(initial=0)) + 1))[np.clip(mask, 0, None)]
  tint = (mask > 0)[..., None] * alpha
  return rgb * (1 - tint) + colours * tint


def draw_box(ax, box: Sequence[float], shape: Sequence[int], colour: str, text: str = '') -> None:
  """A (ymin, xmin, ymax, xmax) box in image fractions on an axis showing a (H, W) image."""
  from matplotlib.patches import Rectangle
  h, w = shape[:2]
  y0, x0, y1, x1 = (float(v) for v in box)
  ax.add_patch(Rectangle((x0 * w - 0.5, y0 * h - 0.5), (x1 - x0) * w, (y1 - y0) * h,
                         fill=False, edgecolor=colour, linewidth=1.5))
  if text:
    ax.text(x0 * w - 0.5, y0 * h - 1.0, text, color=colour, fontsize=7, va='bottom')


def grid(path: str, columns: Sequence[str], rows: int,
         draw: Callable[[object, int, int], None], *, title: str | None = None) -> str:
  """Writes a rows x len(columns) grid PNG to `path`; `draw(ax, row, column)` fills each cell."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  rows = min(rows, MAX_ROWS)
  fig, axes = plt.subplots(rows, len(columns), figsize=(2.1 * len(columns), 2.1 * rows + 0.3),
                           squeeze=False)
  for r in range(rows):
    for c, name in enumerate(columns):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(name, fontsize=9)
      draw(ax, r, c)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


__all__ = ['MAX_ROWS', 'class_name', 'as_rgb', 'palette', 'overlay', 'draw_box', 'grid']
