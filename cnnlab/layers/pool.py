"""Pooling: max and average (PyTorch's padding and ceil-mode semantics), global, adaptive.

On CPU max pooling is the maximum of the window's strided views with a written-out gradient
(`_max_pool`), which XLA:CPU runs far faster than reduce_window's select-and-scatter; on other
platforms it is `lax.reduce_window` and its own gradient. Both send each window's gradient to its
first maximum. The choice is made for the platform the computation is compiled for.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnlab import geometry
from cnnlab.layers.common import (IntOrPair, POOLS, check_choice, check_output, pair,
                                  spatial_input)
from cnnlab.platforms import platform_dependent

class Pool(nn.Module):
  """Max or average pooling over H and W.

  Attributes:
    kind: 'max' | 'avg'.  window, strides (default: window): ints or pairs.
    padding: as for ConvBlock. Max pooling pads with -inf.
    count_include_pad: average pooling divides by the whole window including explicit padding
      (PyTorch's default) or only by the input cells it covers.
    ceil_mode: PyTorch's ceil_mode, keeping a last partial window (never counted as padding).
  Input (B, H, W, C) -> output (B, H', W', C).
  """
  kind: str = 'max'
  window: IntOrPair = 2
  strides: IntOrPair | None = None
  padding: geometry.PaddingLike = 0
  count_include_pad: bool = True
  ceil_mode: bool = False

  def __post_init__(self):
    check_choice('pool', self.kind, ('max', 'avg'))
    pair(self.window, 'pool window')
    if self.strides is not None:
      pair(self.strides, 'pool strides')
    geometry.check_padding(self.padding, name='pool padding')
    super().__post_init__()

  def geometry(self, spatial: Sequence[int]):
    """((window, stride, (lo, hi), extra_hi) for H, W): the resolved window arithmetic."""
    window = pair(self.window, 'pool window')
    strides = window if self.strides is None else pair(self.strides, 'pool strides')
    dims = []
    for i in range(2):
      lo, hi = geometry.resolve_padding(geometry.padding_for_dim(self.padding, i), window[i],
                                        strides[i], 1, spatial[i])
      extra = geometry.ceil_mode_extra(spatial[i], window[i], strides[i], lo, hi) if self.ceil_mode else 0
      dims.append((window[i], strides[i], (lo, hi), extra))
    return dims

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    spatial_input(self, x)
    dims = self.geometry(x.shape[1:3])
    out = [(x.shape[1 + i] + lo + hi + extra - w) // s + 1
           for i, (w, s, (lo, hi), extra) in enumerate(dims)]
    check_output(self, x, out, f'{self.kind} pooling with window {pair(self.window, "window")}')
    window = (1,) + tuple(d[0] for d in dims) + (1,)
    strides = (1,) + tuple(d[1] for d in dims) + (1,)
    pads = ((0, 0),) + tuple((lo, hi + extra) for _, _, (lo, hi), extra in dims) + ((0, 0),)
    if self.kind == 'max':
      return max_pool(x, window[1:3], strides[1:3], pads[1:3], tuple(out))
    summed = lax.reduce_window(x, 0.0, lax.add, window, strides, pads)
    # Divisor per output cell: the cells each window covers that count (static, built in numpy).
    spatial = np.ones(x.shape[1:3], np.float32)
    if self.count_include_pad:  # explicit padding counts, ceil-mode overhang does not
      spatial = np.pad(spatial, [(lo, hi) for _, _, (lo, hi), _ in dims], constant_values=1.0)
      count_pads = [(0, extra) for *_, extra in dims]
    else:
      count_pads = [(lo, hi + extra) for _, _, (lo, hi), extra in dims]
    counts = lax.reduce_window(jnp.asarray(spatial), 0.0, lax.add, window[1:3], strides[1:3],
                               count_pads)
    return summed / counts[None, :, :, None].astype(summed.dtype)


def _window_views(padded: jax.Array, window, strides, out) -> list[tuple[int, int, jax.Array]]:
  """(i, j, view) for each cell (i, j) of the window, row-major: the strided (B, out..., C) slice."""
  views = []
  for i in range(window[0]):
    for j in range(window[1]):
      limit = (padded.shape[0], i + strides[0] * (out[0] - 1) + 1,
               j + strides[1] * (out[1] - 1) + 1, padded.shape[3])
      views.append((i, j, lax.slice(padded, (0, i, j, 0), limit, (1, *strides, 1))))
  return views


def max_pool(x: jax.Array, window, strides, pads, out) -> jax.Array:
  """(B, H, W, C) -> (B, *out, C) maxima of `window`-sized windows every `strides` cells of the
  input padded by `pads` ((lo, hi) per spatial dim) with -inf: `_max_pool` on CPU,
  `lax.reduce_window` elsewhere (the same values and the same gradient)."""
  def reduce_window(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1),
                             (1, *strides, 1), ((0, 0), *pads, (0, 0)))
  return platform_dependent(x, cpu=lambda x: _max_pool(x, window, strides, pads, out),
                            default=reduce_window)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x: jax.Array, window, strides, pads, out) -> jax.Array:
  """Max pooling as the elementwise maximum of the window's strided views of the -inf-padded input.

  The same values as `lax.reduce_window(x, -inf, max, ...)`, but a far cheaper gradient on CPU:
  XLA:CPU expands reduce_window's (select-and-scatter) into index iotas, a variadic reduce-window
  and a scatter, about 23 ms for a 128x14x14x64 map where this takes 0.5 ms (`bench/README.md`).
  The gradient is written out (`_max_pool_bwd`): each output's gradient goes to the first cell of
  its window, in row-major order, that holds the maximum, as in PyTorch. (Autodiff of the maximum
  chain would share it between tied cells, through selects and divisions that cost 0.4 s a step in
  GoogLeNet's bfloat16 pools.)

  The forward pass records which cell won (an int8 index per output) and the backward pass routes
  by that index. It must not find the winner again by comparing the input with the maximum: inside
  a network XLA may recompute the input in the backward pass with other fusions, whose rounding
  differs from the forward's, and an equality test then misses windows and drops their gradient
  (a third of some batch-norm gradients in the quickstart, in float64 as in float32;
  `bench/parallel_equivalence.py`).
  """
  return _max_pool_fwd(x, window, strides, pads, out)[0]


def _max_pool_fwd(x, window, strides, pads, out):
  padded = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
  index_dtype = jnp.int8 if window[0] * window[1] <= 127 else jnp.int32
  result = index = None
  for k, (_, _, view) in enumerate(_window_views(padded, window, strides, out)):
    if result is None:
      result, index = view, jnp.zeros(view.shape, index_dtype)
      continue
    index = jnp.where(view > result, jnp.asarray(k, index_dtype), index)  # the first maximum wins
    result = jnp.maximum(result, view)  # (propagates NaN, as reduce_window does)
  return result, (index, padded.shape)


def _max_pool_bwd(window, strides, pads, out, residuals, g):
  index, padded_shape = residuals
  grad = jnp.zeros(padded_shape, g.dtype)
  zero = jnp.zeros((), g.dtype)
  cells = [(i, j) for i in range(window[0]) for j in range(window[1])]
  for k, (i, j) in enumerate(cells):
    # Back to the view's cells of the padded input: the transpose of the strided slice.
    config = [(0, 0, 0),
              (i, padded_shape[1] - i - strides[0] * (out[0] - 1) - 1, strides[0] - 1),
              (j, padded_shape[2] - j - strides[1] * (out[1] - 1) - 1, strides[1] - 1),
              (0, 0, 0)]
    grad = grad + lax.pad(jnp.where(index == k, g, zero), zero, config)
  (lo_h, _), (lo_w, _) = pads
  h, w = padded_shape[1] - sum(pads[0]), padded_shape[2] - sum(pads[1])
  return (grad[:, lo_h:lo_h + h, lo_w:lo_w + w, :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def make_pool(kind: str, window: IntOrPair = 2, strides: IntOrPair | None = None,
              padding: geometry.PaddingLike = 0, name: str | None = None, **kwargs) -> Pool | None:
  """The `pool` choice every stack offers: 'max' | 'avg' | 'none' (None: no pooling layer)."""
  check_choice('pool', kind, POOLS)
  if kind == 'none':
    return None
  return Pool(kind, window, strides, padding, name=name, **kwargs)


class GlobalPool(nn.Module):
  """Global average or max pooling: (B, H, W, C) -> (B, C)."""
  kind: str = 'avg'

  def __post_init__(self):
    check_choice('global pool', self.kind, ('avg', 'max'))
    super().__post_init__()

  def __call__(self, x: jax.Array) -> jax.Array:
    spatial_input(self, x)
    return jnp.mean(x, axis=(1, 2)) if self.kind == 'avg' else jnp.max(x, axis=(1, 2))


def _adaptive_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(out, in) averaging matrix of PyTorch's adaptive pooling windows along one dim."""
  # float64 (the caller casts it to the input dtype): exact fractions for a float64 input, and
  # the same float32 values as before for a float32 one.
  m = np.zeros((size_out, size_in), np.float64)
  for i in range(size_out):
    start, end = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


class AdaptiveAvgPool(nn.Module):
  """PyTorch's AdaptiveAvgPool2d: (B, H, W, C) -> (B, *output_size, C).

  A rectangle's mean is the product of two 1-D means, so this is two small static matrices.
  """
  output_size: IntOrPair = 1

  def __call__(self, x: jax.Array) -> jax.Array:
    spatial_input(self, x)
    oh, ow = pair(self.output_size, 'output_size')
    mh = jnp.asarray(_adaptive_matrix(x.shape[1], oh), x.dtype)
    mw = jnp.asarray(_adaptive_matrix(x.shape[2], ow), x.dtype)
    return jnp.einsum('oh,bhwc,pw->bopc', mh, x, mw)
