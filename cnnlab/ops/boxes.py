"""Box arithmetic. A box is (ymin, xmin, ymax, xmax), in any unit, with min <= max; an empty box
(zero area) has IoU 0 with everything, itself included (torchvision gives NaN there).

`paired_*` compare boxes row by row, (..., 4) with (..., 4) -> (...); `box_iou` and
`generalized_box_iou` compare every box of one set with every box of another, (N, 4) with (M, 4)
-> (N, M), as torchvision.ops does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def area(boxes: jax.Array) -> jax.Array:
  """(..., 4) -> (...) areas (0 for an inverted box)."""
  return (jnp.maximum(boxes[..., 2] - boxes[..., 0], 0) *
          jnp.maximum(boxes[..., 3] - boxes[..., 1], 0))


def _intersection_union(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Intersection and union areas of broadcast-compatible (..., 4) boxes."""
  low = jnp.maximum(a[..., :2], b[..., :2])
  high = jnp.minimum(a[..., 2:], b[..., 2:])
  inter = jnp.prod(jnp.maximum(high - low, 0), axis=-1)
  return inter, area(a) + area(b) - inter


def _safe_divide(n: jax.Array, d: jax.Array) -> jax.Array:
  return jnp.where(d > 0, n / jnp.where(d > 0, d, 1), 0)


def paired_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """IoU of a[i] with b[i]: (..., 4), (..., 4) -> (...)."""
  inter, union = _intersection_union(a, b)
  return _safe_divide(inter, union)


def paired_giou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Generalized IoU (Rezatofighi et al. 2019) of a[i] with b[i]: IoU minus the fraction of the
  smallest enclosing box that the union leaves empty; in [-1, 1]."""
  inter, union = _intersection_union(a, b)
  enclosing = area(jnp.concatenate([jnp.minimum(a[..., :2], b[..., :2]),
                                    jnp.maximum(a[..., 2:], b[..., 2:])], axis=-1))
  return _safe_divide(inter, union) - _safe_divide(enclosing - union, enclosing)


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """(N, 4), (M, 4) -> (N, M) IoU of every pair (torchvision.ops.box_iou)."""
  return paired_iou(a[:, None, :], b[None, :, :])


def generalized_box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """(N, 4), (M, 4) -> (N, M) GIoU of every pair (torchvision.ops.generalized_box_iou)."""
  return paired_giou(a[:, None, :], b[None, :, :])


__all__ = ['area', 'paired_iou', 'paired_giou', 'box_iou', 'generalized_box_iou']
