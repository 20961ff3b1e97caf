"""On-device augmentation and normalisation: pure, jittable functions of (key, batch).

A batch is a dict with 'image' (B, H, W, C) uint8 and optionally 'mask' (B, H, W) uint8 and 'bbox'
(B, 4) float32 (ymin, xmin, ymax, xmax in [0, 1]), or, for several objects per image (N of them,
padded), 'labels' (B, N) int32, 'boxes' (B, N, 4) float32, 'num_objects' (B,) int32 and the
instance ids 'instances' (B, H, W) uint8 (0 background, i + 1 object i). Geometric transforms move
masks and boxes with their images: masks (`MASK_KEYS`) are resampled with nearest neighbour, boxes
(`BOX_KEYS`, any (B, ..., 4)) are mapped corner by corner and clipped to the image (a box pushed
entirely outside becomes empty, ymin == ymax or xmin == xmax). The primitives move every box, the
padding too; `drop_empty_objects`, which `apply` runs once after the geometric transforms, drops
the objects left without area and restores the padding. Images stay uint8 through every
transform, so `normalize` is the single place they become float.

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
from cnnlab.data.shapes import PAD_LABEL

Batch = dict[str, jax.Array]
MASK_KEYS = ('mask', 'instances')  # (B, H, W) uint8 maps of labels or instance ids
BOX_KEYS = ('bbox', 'boxes')  # (B, 4) or (B, N, 4) (ymin, xmin, ymax, xmax) in [0, 1]
# A box less than this many pixels high or wide after a transform has left the frame (it also
# absorbs float rounding at the border): `drop_empty_objects` drops its object.
MIN_BOX_PIXELS = 0.5
CROP_MODES = ('zero', 'reflect')
FLIPS = ('none', 'random', 'alternate')
# The fixed key behind the alternating flip's per-example coin: it must not change between epochs.
_ALTERNATE_FLIP_KEY = 0x5EED


def _to_uint8(x: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def _per_box(x: jax.Array, boxes: jax.Array) -> jax.Array:
  """Per-example values x (B,) shaped to broadcast against boxes (B, ..., 4) without the last axis
  (one value per box)."""
  return x.reshape(x.shape[:1] + (1,) * (boxes.ndim - 2))


def _map_boxes(batch: Batch, out: Batch, fn) -> None:
  """out[key] = fn(batch[key]) for the box keys present; fn maps (B, ..., 4) float32 boxes to the
  same shape, and the result keeps the input's dtype."""
  for key in BOX_KEYS:
    if key in batch:
      out[key] = fn(batch[key].astype(jnp.float32)).astype(batch[key].dtype)


def shift(batch: Batch, dy: jax.Array, dx: jax.Array, *, pad: int, mode: str = 'zero') -> Batch:
  """Moves each image down by dy[i] and right by dx[i] pixels, (B,) ints with |d| <= pad.

  Uncovered pixels are zero ('zero') or mirrored from the border ('reflect', masks and instance
  ids likewise, while boxes only move: a mirrored part of an object is not in its box). This is a
  random crop of the padded image, so crop-with-padding and translation share it.
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
  for key in ('image', *MASK_KEYS):
    if key in batch:
      out[key] = jax.vmap(one)(batch[key], dy, dx)
  height, width = batch['image'].shape[1:3]
  fy, fx = dy.astype(jnp.float32) / height, dx.astype(jnp.float32) / width

  def move(box):
    offset = jnp.stack([_per_box(fy, box), _per_box(fx, box)] * 2, -1)
    return jnp.clip(box + offset, 0.0, 1.0)

  _map_boxes(batch, out, move)
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
  for key in ('image', *MASK_KEYS):
    if key in batch:
      x = batch[key]
      where = do_flip.reshape((-1,) + (1,) * (x.ndim - 1))
      out[key] = jnp.where(where, x[:, :, ::-1], x)

  def mirror(box):
    ymin, xmin, ymax, xmax = jnp.moveaxis(box, -1, 0)
    mirrored = jnp.stack([ymin, 1.0 - xmax, ymax, 1.0 - xmin], -1)
    return jnp.where(_per_box(do_flip, box)[..., None], mirrored, box)

  _map_boxes(batch, out, mirror)
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
  for key, order in (('image', 1), *((k, 0) for k in MASK_KEYS)):
    if key in batch:
      out[key] = jax.vmap(lambda x, m, d: sample(x, m, d, order), in_axes=(0, 0, d_axis))(
          batch[key], matrices, displacement)

  def forward(box):  # (B, ..., 4) -> the box around the 4 mapped corners of each box
    ymin, xmin, ymax, xmax = jnp.moveaxis(box, -1, 0)
    corners = jnp.stack([jnp.stack([xmin, xmax, xmin, xmax], -1) * width - width / 2,
                         jnp.stack([ymin, ymin, ymax, ymax], -1) * height - height / 2], -1)
    # Forward map, the inverse of `sample`'s: p = A^-1 (source - t), with the 2x2 inverse written
    # out (elementwise, so it keeps the batch's sharding). (B, ..., 4) pixels.
    entry = lambda i, k: matrices[:, i, k].reshape((-1,) + (1,) * (box.ndim - 1))
    a, b, tx = (entry(0, k) for k in range(3))
    c, d, ty = (entry(1, k) for k in range(3))
    det = a * d - b * c
    sx, sy = corners[..., 0] - tx, corners[..., 1] - ty
    new_x = ((d * sx - b * sy) / det + width / 2) / width
    new_y = ((a * sy - c * sx) / det + height / 2) / height
    moved = jnp.stack([new_y.min(-1), new_x.min(-1), new_y.max(-1), new_x.max(-1)], -1)
    return jnp.clip(moved, 0.0, 1.0)

  _map_boxes(batch, out, forward)
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


def drop_empty_objects(batch: Batch) -> Batch:
  """Drops the objects whose boxes a geometric transform left without area, and compacts the rest.

  A counted object (index < num_objects) is dropped when its box is less than MIN_BOX_PIXELS high
  or wide (the transforms clip boxes to the image, so a box pushed out of the frame is left flat).
  The kept objects move to the front in their order; the slots after them get label PAD_LABEL and
  box zeros, and num_objects counts the kept ones. 'instances' ids are renumbered to match (a
  dropped object's pixels become background 0, in 'mask' too). Jittable, shapes unchanged; a
  batch without 'boxes' is returned as is. Boxes partly out of the frame were already clipped.
  After a rotation a box (around the mapped corners) contains its object, so an object near a
  corner can keep a box inside the frame with none of its pixels left there.
  """
  if 'boxes' not in batch:
    return batch
  for key in ('labels', 'num_objects'):
    if key not in batch:
      raise DataError(f"a batch with 'boxes' needs {key!r} too; this one has {sorted(batch)}")
  boxes, labels, count = batch['boxes'], batch['labels'], batch['num_objects']
  height, width = batch['image'].shape[1:3]
  n = boxes.shape[1]
  ymin, xmin, ymax, xmax = jnp.moveaxis(boxes.astype(jnp.float32), -1, 0)  # (B, N) each
  keep = ((jnp.arange(n, dtype=jnp.int32)[None, :] < count[:, None].astype(jnp.int32))
          & ((ymax - ymin) * height >= MIN_BOX_PIXELS)
          & ((xmax - xmin) * width >= MIN_BOX_PIXELS))
  order = jnp.argsort((~keep).astype(jnp.int32), axis=1, stable=True)  # kept first, in order
  kept = jnp.take_along_axis(keep, order, 1)
  out = dict(batch)
  out['labels'] = jnp.where(kept, jnp.take_along_axis(labels, order, 1),
                            jnp.asarray(PAD_LABEL, labels.dtype))
  out['boxes'] = jnp.where(kept[..., None], jnp.take_along_axis(boxes, order[..., None], 1),
                           jnp.zeros((), boxes.dtype))
  out['num_objects'] = keep.sum(1, dtype=jnp.int32).astype(count.dtype)
  if 'instances' in batch:
    # Old id j + 1 -> new id (kept objects before it) + 1, or 0 where object j is dropped.
    new_id = jnp.where(keep, jnp.cumsum(keep, 1, dtype=jnp.int32), 0)
    table = jnp.concatenate([jnp.zeros_like(new_id[:, :1]), new_id], 1)  # (B, N + 1)
    old = batch['instances'].astype(jnp.int32)
    renumbered = jax.vmap(lambda t, ids: t[ids])(table, old)
    out['instances'] = renumbered.astype(batch['instances'].dtype)
    if 'mask' in batch:
      out['mask'] = jnp.where((old > 0) & (renumbered == 0), jnp.zeros((), batch['mask'].dtype),
                              batch['mask'])
  return out


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
  shear and elastic distortion in one resampling), flip, then `drop_empty_objects` when any of
  those ran, cutout, mixup/cutmix. batch: 'image' (B, H, W, C) uint8, optional 'mask', 'bbox', the
  multi-object keys ('labels', 'boxes', 'num_objects', 'instances'), and 'index'/'epoch' for the
  alternating flip; the result has the same keys, shapes and dtypes, plus 'label_mix' (B,) and
  'mix_weight' (B,) float32 when mixup or cutmix is on (loss = w * CE(label) + (1 - w) *
  CE(label_mix); they need a single 'label' per example).
  """
  _check(aug_cfg)
  mixing_on = aug_cfg['mixup_alpha'] or aug_cfg['cutmix_alpha']
  if mixing_on and 'label' not in batch:
    raise DataError("config.data.augment.mixup_alpha / cutmix_alpha mix one 'label' per example; "
                    f'this batch has none (keys: {sorted(batch)}): set them to 0')
  keys = jax.random.split(key, 6)
  moved = False  # whether a geometric transform ran
  if aug_cfg['crop_padding']:
    batch = random_shift(keys[0], batch, int(aug_cfg['crop_padding']), aug_cfg['crop_mode'])
    moved = True
  if aug_cfg['translate']:
    batch = random_shift(keys[1], batch, int(aug_cfg['translate']), 'zero')
    moved = True
  if aug_cfg['rotate'] or aug_cfg['scale'] or aug_cfg['shear'] or aug_cfg['elastic_alpha']:
    batch = random_affine(keys[2], batch, rotate=float(aug_cfg['rotate']),
                          scale=float(aug_cfg['scale']), shear=float(aug_cfg['shear']),
                          elastic_alpha=float(aug_cfg['elastic_alpha']),
                          elastic_sigma=float(aug_cfg['elastic_sigma']))
    moved = True
  if aug_cfg['flip'] == 'random':
    batch = random_flip(keys[3], batch)
    moved = True
  elif aug_cfg['flip'] == 'alternate':
    batch = alternating_flip(batch)
    moved = True
  if moved:
    batch = drop_empty_objects(batch)
  if aug_cfg['cutout']:
    batch = random_cutout(keys[4], batch, int(aug_cfg['cutout']))
  if mixing_on:
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
