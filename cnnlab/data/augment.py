"""On-device augmentation and normalisation: pure, jittable functions of (key, batch).

A batch is a dict with 'image' (B, H, W, C) uint8 and optionally 'mask' (B, H, W) uint8 and 'bbox'
(B, 4) float32 (ymin, xmin, ymax, xmax in [0, 1]). Geometric transforms move masks and boxes with
their images: masks are resampled with nearest neighbour, boxes are mapped corner by corner and
clipped to the image (a box pushed entirely outside becomes empty, ymin == ymax or xmin == xmax).
Images stay uint8 through every transform, so `normalize` is the single place they become float.

Each `random_*` function draws per-example parameters from its key and calls a deterministic
primitive (`shift`, `flip`, `warp` and its `rotate`, `cutout`) that tests can drive directly.
`apply` runs the transforms chosen by `config.data.augment` (`cnnlab.data.config.augment_config`).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnlab.data import mixing
from cnnlab.data.device import like_batch
from cnnlab.data.errors import DataError

Batch = dict[str, jax.Array]
CROP_MODES = ('zero', 'reflect')
FLIPS = ('none', 'random', 'alternate')
# The fixed key behind the alternating flip's per-example coin: it must not change between epochs.
_ALTERNATE_FLIP_KEY = 0x5EED


def _to_uint8(x: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def shift(batch: Batch, dy: jax.Array, dx: jax.Array, *, pad: int, mode: str = 'zero') -> Batch:
  """Moves each image down by dy[i] and right by dx[i] pixels, (B,) ints with |d| <= pad.

  Uncovered pixels are zero ('zero') or mirrored from the border ('reflect', masks likewise).
  This is a random crop of the padded image, so crop-with-padding and translation share it.
  """
  if mode not in CROP_MODES:
    raise DataError(f'crop mode must be one of {CROP_MODES}, got {mode!r}')
  pad_mode = 'constant' if mode == 'zero' else 'reflect'

  def one(x, dy, dx):  # (H, W, ...) -> (H, W, ...)
    widths = [(pad, pad), (pad, pad)] + [(0, 0)] * (x.ndim - 2)
    padded = jnp.pad(x, widths, mode=pad_mode)
    start = (pad - dy, pad - dx) + (0,) * (x.ndim - 2)
    return lax.dynamic_slice(padded, start, x.shape)

  out = dict(batch)
  dy, dx = jnp.asarray(dy, jnp.int32), jnp.asarray(dx, jnp.int32)
  for key in ('image', 'mask'):
    if key in batch:
      out[key] = jax.vmap(one)(batch[key], dy, dx)
  if 'bbox' in batch:
    height, width = batch['image'].shape[1:3]
    fy, fx = dy.astype(jnp.float32) / height, dx.astype(jnp.float32) / width
    offset = jnp.stack([fy, fx, fy, fx], -1)
    out['bbox'] = jnp.clip(batch['bbox'] + offset, 0.0, 1.0).astype(batch['bbox'].dtype)
  return out


def random_shift(key: jax.Array, batch: Batch, max_shift: int, mode: str = 'zero') -> Batch:
  """Shift by integers uniform in [-max_shift, max_shift] on each axis, per example."""
  size = batch['image'].shape[0]
  dy, dx = like_batch(jax.random.randint(key, (2, size), -max_shift, max_shift + 1).T,
                      batch['image']).T
  return shift(batch, dy, dx, pad=max_shift, mode=mode)


def flip(batch: Batch, do_flip: jax.Array) -> Batch:
  """Mirrors left-right the examples where do_flip (B,) bool is True."""
  out = dict(batch)
  for key in ('image', 'mask'):
    if key in batch:
      x = batch[key]
      where = do_flip.reshape((-1,) + (1,) * (x.ndim - 1))
      out[key] = jnp.where(where, x[:, :, ::-1], x)
  if 'bbox' in batch:
    ymin, xmin, ymax, xmax = jnp.moveaxis(batch['bbox'], -1, 0)
    mirrored = jnp.stack([ymin, 1.0 - xmax, ymax, 1.0 - xmin], -1)
    out['bbox'] = jnp.where(do_flip[:, None], mirrored, batch['bbox'])
  return out


def random_flip(key: jax.Array, batch: Batch) -> Batch:
  """Each example flipped with probability 1/2."""
  do_flip = jax.random.bernoulli(key, 0.5, (batch['image'].shape[0],))
  return flip(batch, like_batch(do_flip, batch['image']))


def alternating_flip(batch: Batch) -> Batch:
  """The derandomised flip: example i is flipped iff coin(i) xor (epoch is odd).

  coin(i) is a fixed random bit per example, so each epoch flips a random half and every example
  alternates between epochs. Needs the 'index' and 'epoch' (B,) keys the pipelines provide.
  """
  for key in ('index', 'epoch'):
    if key not in batch:
      raise DataError(f"flip='alternate' needs batch[{key!r}] (B,), which the cnnlab pipelines "
                      f'provide; this batch has {sorted(batch)}')
  base = jax.random.PRNGKey(_ALTERNATE_FLIP_KEY)
  coin = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(base, i)))(batch['index'])
  return flip(batch, coin ^ (batch['epoch'] % 2 == 1))


def _centred_grid(height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """(H, W) x and y of the pixel centres, in pixels from the image centre (y points down)."""
  ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) + (0.5 - height / 2),
                        jnp.arange(width, dtype=jnp.float32) + (0.5 - width / 2), indexing='ij')
  return xs, ys


def warp(batch: Batch, matrices: jax.Array, displacement: jax.Array | None = None) -> Batch:
  """Resamples each example through an inverse map: output pixel p reads source A p + t + d(p).

  matrices: (B, 2, 3) [A | t] acting on (x, y) in pixels from the image centre, y down (the
  identity is [[1, 0, 0], [0, 1, 0]]). displacement: optional (B, H, W, 2) per-pixel (dx, dy) in
  pixels added to the source position (elastic distortion). Images are resampled bilinearly and
  masks by nearest neighbour, zero outside the source; boxes become the box around their corners
  mapped forward by the affine part (a displacement, a pixel or two, does not move boxes).
  """
  images = batch['image']
  height, width = images.shape[1:3]
  xs, ys = _centred_grid(height, width)
  matrices = jnp.asarray(matrices, jnp.float32)

  def sample(x, m, d, order):  # x (H, W, ...): read every output pixel from its source position
    src_x = m[0, 0] * xs + m[0, 1] * ys + m[0, 2] + width / 2 - 0.5
    src_y = m[1, 0] * xs + m[1, 1] * ys + m[1, 2] + height / 2 - 0.5
    if d is not None:
      src_x, src_y = src_x + d[..., 0], src_y + d[..., 1]
    planes = x.reshape(height, width, -1).astype(jnp.float32)
    out = jax.vmap(
        lambda p: jax.scipy.ndimage.map_coordinates(p, [src_y, src_x], order, mode='constant'),
        in_axes=-1, out_axes=-1)(planes)
    return _to_uint8(out).reshape(x.shape)

  d_axis = None if displacement is None else 0
  out = dict(batch)
  for key, order in (('image', 1), ('mask', 0)):
    if key in batch:
      out[key] = jax.vmap(lambda x, m, d: sample(x, m, d, order), in_axes=(0, 0, d_axis))(
          batch[key], matrices, displacement)
  if 'bbox' in batch:
    ymin, xmin, ymax, xmax = jnp.moveaxis(batch['bbox'], -1, 0)
    corners = jnp.stack([jnp.stack([xmin, xmax, xmin, xmax], -1) * width - width / 2,
                         jnp.stack([ymin, ymin, ymax, ymax], -1) * height - height / 2], -1)
    # Forward map, the inverse of `sample`'s: p = A^-1 (source - t), with the 2x2 inverse written
    # out (elementwise, so it keeps the batch's sharding). (B, 4) pixels.
    a, b, tx = (matrices[:, 0, k, None] for k in range(3))
    c, d, ty = (matrices[:, 1, k, None] for k in range(3))
    det = a * d - b * c
    sx, sy = corners[..., 0] - tx, corners[..., 1] - ty
    new_x = ((d * sx - b * sy) / det + width / 2) / width
    new_y = ((a * sy - c * sx) / det + height / 2) / height
    box = jnp.stack([new_y.min(-1), new_x.min(-1), new_y.max(-1), new_x.max(-1)], -1)
    out['bbox'] = jnp.clip(box, 0.0, 1.0).astype(batch['bbox'].dtype)
  return out


def affine_matrices(degrees: jax.Array, zoom: jax.Array | None = None,
                    shear: jax.Array | None = None) -> jax.Array:
  """(B, 2, 3) inverse maps for `warp` that rotate each image counter-clockwise (as displayed) by
  degrees[i], then shear it by shear[i] degrees along x and magnify it by zoom[i] (> 1: larger)."""
  theta = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
  zoom = jnp.ones_like(theta) if zoom is None else jnp.asarray(zoom, jnp.float32)
  phi = jnp.zeros_like(theta) if shear is None else jnp.deg2rad(jnp.asarray(shear, jnp.float32))
  cos, sin, tan = jnp.cos(theta), jnp.sin(theta), jnp.tan(phi)
  zero = jnp.zeros_like(theta)
  # Forward: zoom . shear (x' = x + tan(phi) y) . rotation; inverse R^-1 [[1, -tan], [0, 1]] / zoom
  rows = [jnp.stack([cos, -sin - cos * tan, zero], -1), jnp.stack([sin, cos - sin * tan, zero], -1)]
  return jnp.stack(rows, -2) / zoom[:, None, None]


def rotate(batch: Batch, degrees: jax.Array) -> Batch:
  """Rotates each image about its centre by degrees[i] (B,), counter-clockwise as displayed.

  Images are resampled bilinearly and masks by nearest neighbour, zero outside the source; boxes
  become the box around their rotated corners.
  """
  return warp(batch, affine_matrices(degrees))


def elastic_field(key: jax.Array, shape: tuple[int, int, int], alpha: float,
                  sigma: float) -> jax.Array:
  """(B, H, W, 2) displacements in pixels: Simard et al. (2003)'s elastic distortion.

  Uniform noise in [-1, 1] per pixel and axis, smoothed by a Gaussian of std `sigma` pixels whose
  weights sum to 1 (truncated at 4 sigma, zero beyond the border), times `alpha` pixels. Their
  MNIST setting is alpha=34, sigma=4 (a displacement of about 1.4 pixels rms).
  """
  batch_size, height, width = shape
  noise = jax.random.uniform(key, (batch_size, height, width, 2), jnp.float32, -1.0, 1.0)

  def smoothing(n):  # (n, n): row i holds the Gaussian weights centred on i
    offsets = np.arange(n)[None, :] - np.arange(n)[:, None]
    weights = np.exp(-0.5 * (offsets / sigma) ** 2) * (np.abs(offsets) <= 4 * sigma + 0.5)
    radius = int(4 * sigma + 0.5)
    norm = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).sum()
    return jnp.asarray(weights / norm, jnp.float32)

  # Separable smoothing as two small matmuls (the field is tiny next to the network).
  return alpha * jnp.einsum('hi,bijc,wj->bhwc', smoothing(height), noise, smoothing(width))


def random_affine(key: jax.Array, batch: Batch, *, rotate: float = 0.0, scale: float = 0.0,
                  shear: float = 0.0, elastic_alpha: float = 0.0,
                  elastic_sigma: float = 4.0) -> Batch:
  """One resampling per example: rotation uniform in [-rotate, rotate] degrees, zoom uniform in
  [1 - scale, 1 + scale], shear uniform in [-shear, shear] degrees and, when elastic_alpha > 0,
  an elastic distortion (`elastic_field`)."""
  size, height, width = batch['image'].shape[:3]
  keys = jax.random.split(key, 4)
  draw = lambda k, bound: like_batch(
      jax.random.uniform(k, (size,), jnp.float32, -bound, bound), batch['image'])
  matrices = affine_matrices(draw(keys[0], rotate), 1.0 + draw(keys[1], scale),
                             draw(keys[2], shear))
  field = None
  if elastic_alpha:
    field = like_batch(elastic_field(keys[3], (size, height, width), elastic_alpha, elastic_sigma),
                       batch['image'])
  return warp(batch, matrices, field)


def cutout(batch: Batch, cy: jax.Array, cx: jax.Array, size: int) -> Batch:
  """Zeroes a size x size square of each image centred at (cy[i], cx[i]) pixels, clipped.

  Labels, masks and boxes are unchanged: the object is occluded, not removed.
  """
  images = batch['image']
  height, width = images.shape[1:3]
  top = (cy - size // 2)[:, None, None]
  left = (cx - size // 2)[:, None, None]
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
  return {**batch, 'image': jnp.where(inside[..., None], jnp.uint8(0), images)}


def random_cutout(key: jax.Array, batch: Batch, size: int) -> Batch:
  """Cutout at a centre uniform over the image, per example."""
  batch_size, height, width = batch['image'].shape[:3]
  y_key, x_key = jax.random.split(key)
  cy = like_batch(jax.random.randint(y_key, (batch_size,), 0, height), batch['image'])
  cx = like_batch(jax.random.randint(x_key, (batch_size,), 0, width), batch['image'])
  return cutout(batch, cy, cx, size)


def _check(aug_cfg: Mapping[str, Any]) -> None:
  """Raises DataError naming the first invalid `config.data.augment` value."""
  where = 'config.data.augment'
  for key in ('crop_padding', 'translate', 'cutout'):
    if not isinstance(aug_cfg[key], (int, np.integer)) or aug_cfg[key] < 0:
      raise DataError(f'{where}.{key} must be an int >= 0 (pixels), got {aug_cfg[key]!r}')
  if aug_cfg['crop_mode'] not in CROP_MODES:
    raise DataError(f"{where}.crop_mode must be one of {CROP_MODES}, got {aug_cfg['crop_mode']!r}")
  if aug_cfg['flip'] not in FLIPS:
    raise DataError(f"{where}.flip must be one of {FLIPS}, got {aug_cfg['flip']!r}")
  for key in ('rotate', 'elastic_alpha', 'mixup_alpha', 'cutmix_alpha'):
    if aug_cfg[key] < 0:
      raise DataError(f'{where}.{key} must be >= 0, got {aug_cfg[key]!r}')
  if not 0 <= aug_cfg['scale'] < 1:
    raise DataError(f"{where}.scale must be in [0, 1) (a zoom of 1 +- scale), "
                    f"got {aug_cfg['scale']!r}")
  if not 0 <= aug_cfg['shear'] < 90:
    raise DataError(f"{where}.shear must be in [0, 90) degrees, got {aug_cfg['shear']!r}")
  if aug_cfg['elastic_sigma'] <= 0:
    raise DataError(f"{where}.elastic_sigma must be > 0 pixels, got {aug_cfg['elastic_sigma']!r}")


def apply(aug_cfg: Mapping[str, Any], key: jax.Array, batch: Batch) -> Batch:
  """The augmentations `aug_cfg` (config.data.augment, or a dict with its keys) turns on.

  Pure and jittable; `aug_cfg` values are static. Order: crop, translate, affine (rotation, zoom,
  shear and elastic distortion in one resampling), flip, cutout, mixup/cutmix. batch: 'image'
  (B, H, W, C) uint8, optional 'mask', 'bbox', and 'index'/'epoch' for the alternating flip; the
  result has the same keys, shapes and dtypes, plus 'label_mix' (B,) and 'mix_weight' (B,) float32
  when mixup or cutmix is on (loss = w * CE(label) + (1 - w) * CE(label_mix)).
  """
  _check(aug_cfg)
  keys = jax.random.split(key, 6)
  if aug_cfg['crop_padding']:
    batch = random_shift(keys[0], batch, int(aug_cfg['crop_padding']), aug_cfg['crop_mode'])
  if aug_cfg['translate']:
    batch = random_shift(keys[1], batch, int(aug_cfg['translate']), 'zero')
  if aug_cfg['rotate'] or aug_cfg['scale'] or aug_cfg['shear'] or aug_cfg['elastic_alpha']:
    batch = random_affine(keys[2], batch, rotate=float(aug_cfg['rotate']),
                          scale=float(aug_cfg['scale']), shear=float(aug_cfg['shear']),
                          elastic_alpha=float(aug_cfg['elastic_alpha']),
                          elastic_sigma=float(aug_cfg['elastic_sigma']))
  if aug_cfg['flip'] == 'random':
    batch = random_flip(keys[3], batch)
  elif aug_cfg['flip'] == 'alternate':
    batch = alternating_flip(batch)
  if aug_cfg['cutout']:
    batch = random_cutout(keys[4], batch, int(aug_cfg['cutout']))
  if aug_cfg['mixup_alpha'] or aug_cfg['cutmix_alpha']:
    batch = mixing.mix(keys[5], batch, mixup_alpha=float(aug_cfg['mixup_alpha']),
                       cutmix_alpha=float(aug_cfg['cutmix_alpha']))
  return batch


def normalize(images: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
  """(B, H, W, C) uint8 (0..255) -> (images / 255 - mean) / std in `dtype`; mean, std per channel
  on the 0..1 scale (sequences of length C, or scalars)."""
  channels = images.shape[-1]
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  for name, value in (('mean', mean), ('std', std)):
    if value.ndim > 1 or value.size not in (1, channels):
      raise DataError(f'normalisation {name} has {value.size} values for {channels}-channel images')
  x = images.astype(jnp.float32) / 255.0
  return ((x - mean) / std).astype(dtype)


def normalization(config_data, info) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) per channel for `config.data.normalize`: 'dataset', 'fixed' or 'none'."""
  channels = info.image_shape[-1]
  mode = config_data.normalize
  if mode == 'dataset':
    return tuple(info.mean), tuple(info.std)
  if mode == 'none':
    return (0.0,) * channels, (1.0,) * channels
  if mode == 'fixed':
    mean, std = tuple(config_data.mean), tuple(config_data.std)
    for name, value in (('mean', mean), ('std', std)):
      if len(value) != channels:
        raise DataError(f'config.data.{name} has {len(value)} values but {info.name} images have '
                        f'{channels} channels')
    if min(std) <= 0:
      raise DataError(f'config.data.std must be > 0, got {std}')
    return mean, std
  raise DataError(f"config.data.normalize must be 'dataset', 'fixed' or 'none', got {mode!r}")
