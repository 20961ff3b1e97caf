"""Drawing for the tasks' panels (matplotlib, off-screen): examples side by side, a row per kind of
picture; class masks as colour overlays, boxes as rectangles. A task decides what goes in each
row."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

# Where a panel stops: more examples make the picture unreadable, not more informative.
MAX_EXAMPLES = 8


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


def grid(path: str, kinds: Sequence[str], examples: int,
         draw: Callable[[object, int, int], None], *, title: str | None = None) -> str:
  """Writes a PNG to `path`: one row per kind of picture (input, truth, prediction...), one column
  per example (at most MAX_EXAMPLES); `draw(ax, example, kind)` fills each cell."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  examples = min(examples, MAX_EXAMPLES)
  size = (1.9 * examples + 0.4, 2.0 * len(kinds) + 0.4)  # inches
  fig, axes = plt.subplots(len(kinds), examples, figsize=size, squeeze=False)
  for k, name in enumerate(kinds):
    for e in range(examples):
      ax = axes[k, e]
      ax.set_xticks([])
      ax.set_yticks([])
      if e == 0 and name:
        ax.set_ylabel(name, fontsize=9)
      draw(ax, e, k)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


__all__ = ['MAX_EXAMPLES', 'class_name', 'as_rgb', 'palette', 'overlay', 'draw_box', 'grid']
