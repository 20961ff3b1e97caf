"""RoIAlign (He et al. 2017) as torchvision.ops.roi_align computes it, for NHWC features.

Features are (B, H, W, C); boxes (B, K, 4) are (ymin, xmin, ymax, xmax) in input-image units,
K boxes per batch element (torchvision takes a list of (K_b, 4) (x1, y1, x2, y2) per image, or
(K, 5) rows with the batch index first). The output is (B, K, out_h, out_w, C).

A box maps to feature coordinates as box * spatial_scale, less 0.5 if `aligned` (so that pixel
centres sit at half-integers; with aligned=False a box is at least 1 x 1 there). Each output bin
is the mean of sampling_ratio x sampling_ratio bilinear samples at the centres of a regular grid
over the bin. Edges are those of torchvision's CPU kernel, axis by axis: a sample coordinate in
[-1, 0] moves to 0; one at or past the last pixel (size - 1) reads that pixel alone; a sample
outside [-1, H] x [-1, W] (or NaN) adds 0 but still counts in the mean.

The arithmetic is torchvision's, in its order, but XLA may fuse a multiply and an add into one
rounding, or divide by a constant as a multiplication by its reciprocal: a sample's coordinate
can then be an ulp or two off torchvision's, which moves the output by that much times the
features' difference between neighbouring pixels (and decides differently for a sample within
an ulp of -1 or H).

Only a fixed `sampling_ratio` > 0 is supported: torchvision's adaptive sampling_ratio <= 0 takes
ceil(box size / output size) samples per bin, a number that depends on the data, which static
shapes cannot hold (Faster R-CNN's MultiScaleRoIAlign uses 2).

Gradients flow to the features (a scatter-add of the bilinear weights, as torchvision's
backward) and not to the boxes (torchvision's roi_align has none for them either).
Two formulations, the same numbers up to the order of the sums (`method`):
  'gather'  gathers every sample's four neighbours and sums them weighted: it holds
            B * K * out_h * out_w * (2 sampling_ratio)^2 * C values before the weighted sum (XLA
            may fuse the two), and its gradient is a scatter-add.
  'matmul'  writes each box's bilinear weights as an interpolation matrix (out_h * out_w, H * W),
            the outer product of one matrix per axis (the weights are separable: the product of a
            row weight and a column weight, the off-map rule axis by axis), and multiplies the
            features by it: B * K * out_h * out_w * H * W weights and as many multiply-adds per
            channel; its gradient is the transposed product. Faster on small maps, where
            XLA:CPU's gathers and scatters dominate: output and features' gradient of 16 maps of
            128 channels, 64 boxes each, 7 x 7 bins, sampling_ratio 2, on a 2-core CPU took a
            sixth of the gather's time on 8 x 8 maps, half on 16 x 16, 1.4 times on 24 x 24.
  'auto'    'matmul' for maps of at most MATMUL_MAX_PIXELS_PER_SAMPLE * sampling_ratio^2
            pixels (16 x 16 at sampling_ratio 2), else 'gather'.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# 'auto' multiplies by interpolation matrices up to this many map pixels per sample of a bin.
MATMUL_MAX_PIXELS_PER_SAMPLE = 64
METHODS = ('auto', 'gather', 'matmul')


def _axis_samples(start: jax.Array, bin_size: jax.Array, bins: int, sampling_ratio: int,
                  size: int) -> tuple[jax.Array, jax.Array]:
  """Along one axis of `size` pixels, for boxes starting at `start` (B, K) with bins of `bin_size`
  (B, K): (indices, weights), each (B, K, bins, sampling_ratio, 2): the two pixels each sample
  reads, low then high, with their bilinear weights (0 for a sample off the map)."""
  dtype = start.dtype
  b = jnp.arange(bins, dtype=dtype)[:, None]
  i = jnp.arange(sampling_ratio, dtype=dtype)[None, :] + 0.5
  start, bin_size = start[..., None, None], bin_size[..., None, None]
  coord = start + b * bin_size + i * bin_size / sampling_ratio  # torchvision's order
  inside = (coord >= -1) & (coord <= size)  # False for NaN
  coord = jnp.where(inside & (coord > 0), coord, 0)
  low = coord.astype(jnp.int32)  # truncation: coord >= 0
  at_edge = low >= size - 1
  low = jnp.where(at_edge, size - 1, low)
  high = jnp.where(at_edge, size - 1, low + 1)
  frac = jnp.where(at_edge, 0, coord - low.astype(dtype))
  zero = jnp.zeros((), dtype)
  weights = jnp.stack([jnp.where(inside, 1 - frac, zero), jnp.where(inside, frac, zero)], -1)
  return jnp.stack([low, high], -1), weights


def _interpolation(indices: jax.Array, weights: jax.Array, size: int) -> jax.Array:
  """_axis_samples' (indices, weights) (B, K, bins, s, 2) -> (B, K, bins, size): each bin's
  summed weight on each pixel of the axis."""
  hits = indices[..., None] == jnp.arange(size)
  return jnp.sum(jnp.where(hits, weights[..., None], jnp.zeros((), weights.dtype)), axis=(3, 4))


def _roi_align(features: jax.Array, boxes: jax.Array, output_size: tuple[int, int],
               spatial_scale: float, sampling_ratio: int, aligned: bool,
               method: str = 'gather') -> jax.Array:
  """(B, H, W, C), (B, K, 4) -> (B, K, out_h, out_w, C)."""
  batch, height, width, channels = features.shape
  out_h, out_w = output_size
  dtype = boxes.dtype
  offset = 0.5 if aligned else 0.0
  start = boxes[..., :2] * jnp.asarray(spatial_scale, dtype) - offset
  end = boxes[..., 2:] * jnp.asarray(spatial_scale, dtype) - offset
  extent = end - start
  if not aligned:
    extent = jnp.maximum(extent, 1)
  bin_h, bin_w = extent[..., 0] / out_h, extent[..., 1] / out_w
  ys, wy = _axis_samples(start[..., 0], bin_h, out_h, sampling_ratio, height)
  xs, wx = _axis_samples(start[..., 1], bin_w, out_w, sampling_ratio, width)
  count = jnp.asarray(sampling_ratio * sampling_ratio, features.dtype)
  if method == 'matmul':
    rows = _interpolation(ys, wy, height)  # (B, K, out_h, H)
    columns = _interpolation(xs, wx, width)  # (B, K, out_w, W)
    matrix = (rows[:, :, :, None, :, None] * columns[:, :, None, :, None, :]).reshape(
        batch, -1, height * width).astype(features.dtype)
    pooled = jnp.einsum('bqn,bnc->bqc', matrix, features.reshape(batch, -1, channels),
                        precision=jax.lax.Precision.HIGHEST)
    return pooled.reshape(batch, -1, out_h, out_w, channels) / count
  # (B, K, out_h, s, 2, out_w, s, 2, C): every sample's four neighbours.
  image = jnp.arange(batch)[:, None, None, None, None, None, None, None]
  values = features[image, ys[..., None, None, None], xs[:, :, None, None, None]]
  weights = wy[..., None, None, None] * wx[:, :, None, None, None]
  pooled = jnp.sum(values * weights[..., None].astype(features.dtype), axis=(3, 4, 6, 7))
  return pooled / count


def roi_align(features: jax.Array, boxes: jax.Array, output_size: int | tuple[int, int],
              spatial_scale: float, sampling_ratio: int, aligned: bool = True,
              method: str = 'auto') -> jax.Array:
  """(B, H, W, C) features, (B, K, 4) boxes -> (B, K, out_h, out_w, C): torchvision.ops.
  roi_align(features as NCHW, boxes as (x1, y1, x2, y2), output_size, spatial_scale,
  sampling_ratio, aligned), for sampling_ratio > 0 (see the module docstring). output_size,
  spatial_scale, sampling_ratio, aligned and `method` ('auto' | 'gather' | 'matmul': the
  formulation, module docstring) are static. The boxes' coordinates are computed in their float
  dtype (float32 for integer boxes); the sum in the features' dtype."""
  features, boxes = jnp.asarray(features), jnp.asarray(boxes)
  if features.ndim != 4:
    raise ValueError(f'features must have shape (B, H, W, C), got {features.shape}')
  if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
    raise ValueError(f'boxes must have shape (B, K, 4) with B = {features.shape[0]}, '
                     f'got {boxes.shape}')
  if isinstance(output_size, (int, np.integer)):
    output_size = (output_size, output_size)
  output_size = tuple(output_size)
  if (len(output_size) != 2 or not all(isinstance(s, (int, np.integer)) for s in output_size)
      or min(output_size) < 1):
    raise ValueError(f'output_size must be a positive int or a pair of them, got {output_size!r}')
  if not isinstance(sampling_ratio, (int, np.integer)) or sampling_ratio <= 0:
    raise ValueError(f'sampling_ratio must be an int > 0 (the adaptive sampling_ratio <= 0 of '
                     f'torchvision has data-dependent shapes), got {sampling_ratio!r}')
  if not np.isscalar(spatial_scale) or not float(spatial_scale) > 0:
    raise ValueError(f'spatial_scale must be a number > 0, got {spatial_scale!r}')
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}')
  if method == 'auto':
    small = features.shape[1] * features.shape[2] <= (MATMUL_MAX_PIXELS_PER_SAMPLE
                                                      * sampling_ratio * sampling_ratio)
    method = 'matmul' if small else 'gather'
  if not jnp.issubdtype(boxes.dtype, jnp.floating):
    boxes = boxes.astype(jnp.float32)
  boxes = jax.lax.stop_gradient(boxes)
  return _roi_align(features, boxes, (int(output_size[0]), int(output_size[1])),
                    float(spatial_scale), int(sampling_ratio), bool(aligned), method)


__all__ = ['roi_align', 'METHODS', 'MATMUL_MAX_PIXELS_PER_SAMPLE']
