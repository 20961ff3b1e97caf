"""Mixup and CutMix: each example mixed with a partner, the batch reversed (as timm pairs them).

Both return the batch with 'label_mix' (B,) (the partner's label) and 'mix_weight' (B,) float32,
the weight of the example's own label: loss = w * CE(label) + (1 - w) * CE(label_mix).
Images stay uint8 (a mixup blend is rounded, an error of at most 0.5 / 255).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cnnlab.data.device import like_batch

Batch = dict[str, jax.Array]


def mixup(batch: Batch, weight: jax.Array) -> Batch:
  """image = w * image + (1 - w) * partner, weight (B,) in [0, 1].

  Masks and boxes stay those of the example itself; `mix` draws w >= 1/2 so it dominates.
  """
  images = batch['image'].astype(jnp.float32)
  w = weight.astype(jnp.float32)[:, None, None, None]
  blended = w * images + (1.0 - w) * images[::-1]
  return {**batch, 'image': jnp.clip(jnp.round(blended), 0, 255).astype(jnp.uint8),
          'label_mix': batch['label'][::-1], 'mix_weight': weight.astype(jnp.float32)}


def cut_box(key: jax.Array, batch_size: int, height: int, width: int, area: jax.Array):
  """Boxes covering (B,) `area` fractions (before clipping) at uniform centres, as (B,) arrays
  (top, left, bottom, right) in pixels."""
  ratio = jnp.sqrt(area)
  cut_h = jnp.round(height * ratio).astype(jnp.int32)
  cut_w = jnp.round(width * ratio).astype(jnp.int32)
  y_key, x_key = jax.random.split(key)
  cy = jax.random.randint(y_key, (batch_size,), 0, height)
  cx = jax.random.randint(x_key, (batch_size,), 0, width)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy - cut_h // 2 + cut_h, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx - cut_w // 2 + cut_w, 0, width)
  return top, left, bottom, right


def cutmix(batch: Batch, top, left, bottom, right) -> Batch:
  """Pastes the partner's rows top..bottom-1, cols left..right-1 (each (B,)) into each example.

  The mask follows the pasted pixels; the box stays the example's own. The weight is the area
  that remains the example's own.
  """
  images = batch['image']
  height, width = images.shape[1:3]
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  inside = ((rows >= top[:, None, None]) & (rows < bottom[:, None, None])
            & (cols >= left[:, None, None]) & (cols < right[:, None, None]))  # (B, H, W)
  out = {**batch, 'image': jnp.where(inside[..., None], images[::-1], images)}
  if 'mask' in batch:
    out['mask'] = jnp.where(inside, batch['mask'][::-1], batch['mask'])
  own = 1.0 - inside.mean((1, 2), dtype=jnp.float32)
  out['label_mix'] = batch['label'][::-1]
  out['mix_weight'] = own
  return out


def mix(key: jax.Array, batch: Batch, *, mixup_alpha: float, cutmix_alpha: float) -> Batch:
  """Mixup (Beta(mixup_alpha) weights) and/or CutMix (Beta(cutmix_alpha) areas); with both on,
  each example gets one of them with probability 1/2. An alpha of 0 turns that one off."""
  batch_size, height, width = batch['image'].shape[:3]
  mix_key, cut_key, box_key, choice_key = jax.random.split(key, 4)
  per_example = lambda x: like_batch(x, batch['image'])  # noqa: E731
  results = []
  if mixup_alpha > 0:
    w = jax.random.beta(mix_key, mixup_alpha, mixup_alpha, (batch_size,))
    results.append(mixup(batch, per_example(jnp.maximum(w, 1.0 - w))))
  if cutmix_alpha > 0:
    area = 1.0 - jax.random.beta(cut_key, cutmix_alpha, cutmix_alpha, (batch_size,))
    box = cut_box(box_key, batch_size, height, width, area)
    results.append(cutmix(batch, *map(per_example, box)))
  if len(results) == 1:
    return results[0]
  use_cutmix = per_example(jax.random.bernoulli(choice_key, 0.5, (batch_size,)))
  return jax.tree.map(
      lambda m, c: jnp.where(use_cutmix.reshape((-1,) + (1,) * (m.ndim - 1)), c, m), *results)
