"""Perturbation: occlusion (Zeiler & Fergus 2013), how much the target logit drops when a window
is covered.

Captum's Occlusion semantics: the window slides from the top-left corner by `stride` until it has
covered the last row and column (the last window may hang over the edge, and is cut there); every
pixel's attribution is the mean, over the windows that covered it, of logit(image) minus
logit(image with the window set to the baseline).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.explain import probe


def _window_masks(size: int, window: int, stride: int) -> np.ndarray:
  """(count, size) 0/1 masks of the windows along one dim (Captum's shift count and order)."""
  count = math.ceil((size - window) / stride) + 1
  masks = np.zeros((count, size))
  for i in range(count):
    masks[i, i * stride:i * stride + window] = 1.0  # the last window is cut at the edge
  return masks


Triple = tuple[int, int, int]


def windows(image_shape, window=None, stride=None) -> tuple[Triple, Triple]:
  """The (h, w, c) window and stride for (H, W, C) images, checked; ValueError naming the bad
  one. window: an int (square, all channels), (h, w) (all channels) or (h, w, c); default a
  seventh of the image side. stride: an int (every dim, as Captum) or (h, w) or (h, w, c); default
  half the window. Each stride must be at most its window, unless the window spans that dim."""
  height, width, channels = image_shape
  if window is None:
    window = max(1, min(height, width) // 7)
  window = probe.static_ints(window, 'window', (2, 3))
  window = window if len(window) == 3 else (*window, channels)
  if stride is None:
    stride = (max(1, window[0] // 2), max(1, window[1] // 2), window[2])
  elif isinstance(stride, (int, np.integer)):
    stride = probe.static_ints(stride, 'stride', 3)  # every dim, as Captum's int stride
  stride = probe.static_ints(stride, 'stride', (2, 3))
  stride = stride if len(stride) == 3 else (*stride, window[2])
  for name, w, s, n in zip(('height', 'width', 'channels'), window, stride, image_shape):
    if w > n:
      raise ValueError(f'occlusion window {window} (h, w, c) is larger than the images '
                       f'{tuple(image_shape)} in {name} ({w} > {n})')
    if s > w and w < n:
      raise ValueError(f'occlusion stride {stride} is larger than the window {window} in {name} '
                       f'({s} > {w}): some pixels would never be covered')
  return window, stride


def occlusion(model: nn.Module, variables, images, target, *, window=None, stride=None,
              baseline=0.0, batch_size: int | None = None) -> jax.Array:
  """Attribution of each pixel: the mean drop of the target logit over the windows covering it.

  window, stride: see `windows`. baseline: what covers the window, a scalar (0: the training
  mean, in normalised units) or anything broadcasting to the images. batch_size: images per model
  evaluation (default 256). (B, H, W, C) -> (B, H, W, C).
  """
  images, target, _ = probe.check(model, variables, images, target)
  window, stride = windows(images.shape[1:], window, stride)
  baseline = probe.broadcast_baseline(baseline, images)
  masks = [_window_masks(n, w, s) for n, w, s in zip(images.shape[1:], window, stride)]
  counts = tuple(len(m) for m in masks)
  total = math.prod(counts)
  rows, cols, chans = (jnp.asarray(m, images.dtype) for m in masks)

  def score(x):
    return probe.target_scores(probe.logits(model, variables, x), target)

  def occluded(index):
    i, j, k = jnp.unravel_index(index, counts)
    mask = rows[i][:, None, None] * cols[j][None, :, None] * chans[k][None, None, :]  # (H, W, C)
    return score(images * (1 - mask) + baseline * mask)  # (B,)

  chunk = probe.chunk_size(images.shape[0], batch_size, total)
  # Windows in chunks of `chunk` (the last padded with repeats of window 0, dropped after), each
  # chunk's occluded images evaluated as one batch.
  indices = jnp.asarray(np.pad(np.arange(total), (0, -total % chunk)).reshape(-1, chunk))
  evaluate = jax.vmap(occluded)
  scores = evaluate(indices[0]) if len(indices) == 1 else jax.lax.map(evaluate, indices)
  drops = score(images)[None] - scores.reshape((-1, images.shape[0]))[:total]
  drops = drops.reshape((*counts, images.shape[0]))
  # Each pixel sums the drops of the windows covering it; the windows are products of per-dim
  # masks, so that sum is one contraction. Dividing by the coverage count gives the mean.
  summed = jnp.einsum('ijkb,ih,jw,kc->bhwc', drops, rows, cols, chans,
                      precision=jax.lax.Precision.HIGHEST)
  coverage = np.einsum('ih,jw,kc->hwc', *masks)
  return summed / jnp.asarray(coverage, images.dtype)


__all__ = ['occlusion', 'windows']
