"""On-device augmentation: shapes and dtypes kept, inverses, identities, targets follow images."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cnnlab.data import augment, config, mixing
from cnnlab.data.errors import DataError

B, H, W = 8, 16, 16


def box_of(mask: np.ndarray) -> np.ndarray:
  """(ymin, xmin, ymax, xmax) in [0, 1] around the nonzero pixels of an (H, W) mask."""
  rows, cols = np.nonzero(mask)
  return np.array([rows.min(), cols.min(), rows.max() + 1, cols.max() + 1]) / np.array([H, W, H, W])


def make_batch(seed: int = 0) -> dict:
  """Random images, each with a random rectangle as its mask and the rectangle's box."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (B, H, W, 3), dtype=np.uint8)
  masks = np.zeros((B, H, W), np.uint8)
  boxes = np.zeros((B, 4), np.float32)
  for i in range(B):
    y0, x0 = rng.integers(4, 8, 2)  # >= 4 from the border: a 3-pixel reflection misses it
    y1, x1 = y0 + rng.integers(2, 6), x0 + rng.integers(2, 6)
    masks[i, y0:y1, x0:x1] = i % 3 + 1
    boxes[i] = box_of(masks[i])
  return {'image': jnp.asarray(images), 'label': jnp.arange(B, dtype=jnp.int32),
          'mask': jnp.asarray(masks), 'bbox': jnp.asarray(boxes),
          'index': jnp.arange(B, dtype=jnp.int32) * 7, 'epoch': jnp.zeros(B, jnp.int32)}


def assert_same(a: dict, b: dict, keys=('image', 'mask', 'bbox')):
  for key in keys:
    np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), atol=1e-6, err_msg=key)


def assert_boxes_follow_masks(batch: dict, atol: float):
  for i in range(B):
    np.testing.assert_allclose(np.asarray(batch['bbox'][i]), box_of(np.asarray(batch['mask'][i])),
                               atol=atol, err_msg=f'example {i}')


def all_on() -> dict:
  cfg = config.augment_config().to_dict()
  cfg.update(crop_padding=2, crop_mode='reflect', translate=3, rotate=15.0, scale=0.1, shear=5.0,
             elastic_alpha=8.0, elastic_sigma=3.0, flip='random', cutout=4, mixup_alpha=0.2,
             cutmix_alpha=1.0)
  return cfg


def test_every_augmentation_keeps_shapes_and_dtypes_sharded_or_not():
  """All transforms at once under jit, on a plain batch and on one split over the data axis
  (per-example parameters must follow the batch sharding); both give the same values."""
  mesh = jax.make_mesh((len(jax.devices()),), ('data',))
  batch = make_batch()
  fn = jax.jit(functools.partial(augment.apply, {**all_on(), 'flip': 'alternate'}))
  out = fn(jax.random.PRNGKey(0), batch)
  for key, value in batch.items():
    assert out[key].shape == value.shape and out[key].dtype == value.dtype, key
  assert out['label_mix'].shape == (B,) and out['mix_weight'].dtype == jnp.float32
  assert ((0 <= out['mix_weight']) & (out['mix_weight'] <= 1)).all()
  assert not np.array_equal(np.asarray(out['image']), np.asarray(batch['image']))
  sharded = fn(jax.random.PRNGKey(0), jax.device_put(batch, NamedSharding(mesh, P('data'))))
  assert sharded['image'].sharding.spec[0] == 'data'
  assert_same(sharded, out, keys=('image', 'mask', 'bbox', 'label_mix', 'mix_weight'))


def test_default_config_changes_nothing():
  batch = make_batch()
  out = augment.apply(config.default_config().augment, jax.random.PRNGKey(0), batch)
  assert sorted(out) == sorted(batch)
  assert_same(out, batch)


def test_per_example_randomness_and_key_dependence():
  batch = make_batch()
  batch['image'] = jnp.broadcast_to(batch['image'][:1], batch['image'].shape)  # 8 equal images
  cfg = {**config.augment_config().to_dict(), 'translate': 3}
  out = np.asarray(augment.apply(cfg, jax.random.PRNGKey(1), batch)['image'])
  assert len({o.tobytes() for o in out}) > 1  # examples draw different shifts
  again = np.asarray(augment.apply(cfg, jax.random.PRNGKey(1), batch)['image'])
  other = np.asarray(augment.apply(cfg, jax.random.PRNGKey(2), batch)['image'])
  np.testing.assert_array_equal(out, again)
  assert not np.array_equal(out, other)


def test_flip_twice_is_identity_and_flips_boxes_with_masks():
  batch = make_batch()
  do = jnp.array([True, False] * (B // 2))
  once = augment.flip(batch, do)
  np.testing.assert_array_equal(np.asarray(once['image'][0]),
                                np.asarray(batch['image'][0])[:, ::-1])
  np.testing.assert_array_equal(np.asarray(once['image'][1]), np.asarray(batch['image'][1]))
  assert_boxes_follow_masks(once, 1e-6)
  assert_same(augment.flip(once, do), batch)


def test_zero_shift_is_identity_in_both_modes():
  batch = make_batch()
  zeros = jnp.zeros(B, jnp.int32)
  for mode in ('zero', 'reflect'):
    assert_same(augment.shift(batch, zeros, zeros, pad=3, mode=mode), batch)
  cfg = {**config.augment_config().to_dict(), 'translate': 0, 'crop_padding': 0}
  assert_same(augment.apply(cfg, jax.random.PRNGKey(0), batch), batch)


def test_shift_moves_pixels_masks_and_boxes_together():
  batch = make_batch()
  dy = jnp.full(B, 2, jnp.int32)
  dx = jnp.full(B, -3, jnp.int32)
  out = augment.shift(batch, dy, dx, pad=3, mode='zero')
  image, moved = np.asarray(batch['image']), np.asarray(out['image'])
  np.testing.assert_array_equal(moved[:, 2:, :-3], image[:, :-2, 3:])
  assert (moved[:, :2] == 0).all() and (moved[:, :, -3:] == 0).all()
  assert_boxes_follow_masks(out, 1e-6)


def test_random_crop_and_translation_keep_boxes_on_masks():
  batch = make_batch()
  out = augment.random_shift(jax.random.PRNGKey(3), batch, 3, 'reflect')
  assert_boxes_follow_masks(out, 1e-6)
  assert not np.array_equal(np.asarray(out['mask']), np.asarray(batch['mask']))


def test_rotation_by_zero_and_by_four_quarter_turns_is_identity():
  batch = make_batch()
  assert_same(augment.rotate(batch, jnp.zeros(B)), batch)
  out = batch
  for _ in range(4):
    out = augment.rotate(out, jnp.full(B, 90.0))
  assert_same(out, batch, keys=('image', 'mask'))
  np.testing.assert_allclose(np.asarray(out['bbox']), np.asarray(batch['bbox']), atol=1e-5)


def test_rotation_turns_masks_and_boxes_with_images():
  batch = make_batch()
  quarter = augment.rotate(batch, jnp.full(B, 90.0))
  # Counter-clockwise on screen: the top row becomes the left column, read bottom-up.
  np.testing.assert_array_equal(np.asarray(quarter['image'][:, :, 0]),
                                np.asarray(batch['image'][:, 0, ::-1]))
  assert_boxes_follow_masks(quarter, 1e-5)
  small = augment.random_affine(jax.random.PRNGKey(0), batch, rotate=20.0)
  half_pixel = 0.5 / H  # a mask pixel is kept when its centre falls inside the rotated rectangle
  for i in range(B):  # the box of the rotated corners contains the rotated rectangle
    tight, box = box_of(np.asarray(small['mask'][i])), np.asarray(small['bbox'][i])
    assert (box[:2] <= tight[:2] + half_pixel).all() and (box[2:] >= tight[2:] - half_pixel).all()


def test_warp_matches_torch_grid_sample():
  """Bilinear resampling through random affine maps against PyTorch's grid_sample (zeros outside,
  align_corners=False): on a square image, the pixel map A p + t is (A, 2 t / W) normalised."""
  torch = pytest.importorskip('torch')
  batch = make_batch()
  rng = np.random.default_rng(1)
  matrices = np.concatenate([np.eye(2)[None] + rng.uniform(-0.4, 0.4, (B, 2, 2)),
                             rng.uniform(-3, 3, (B, 2, 1))], -1).astype(np.float32)
  out = np.asarray(augment.warp({'image': batch['image']}, jnp.asarray(matrices))['image'])
  theta = matrices.copy()
  theta[:, :, 2] /= W / 2
  nchw = torch.tensor(np.asarray(batch['image'], np.float32)).permute(0, 3, 1, 2)
  grid = torch.nn.functional.affine_grid(torch.tensor(theta), list(nchw.shape), align_corners=False)
  expected = torch.nn.functional.grid_sample(nchw, grid, mode='bilinear', padding_mode='zeros',
                                             align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(out, np.clip(np.round(expected), 0, 255), atol=1)


def test_zoom_and_shear_move_masks_and_boxes_with_images():
  batch = make_batch()
  assert_same(augment.warp(batch, augment.affine_matrices(jnp.zeros(B), jnp.ones(B),
                                                          jnp.zeros(B))), batch)
  square = np.zeros((B, H, W), np.uint8)
  square[:, 6:10, 6:10] = 1  # a centred 4x4 square
  centred = {'image': jnp.asarray(square[..., None] * 200), 'mask': jnp.asarray(square),
             'bbox': jnp.tile(jnp.asarray([[6 / H, 6 / W, 10 / H, 10 / W]], jnp.float32), (B, 1))}
  doubled = augment.warp(centred, augment.affine_matrices(jnp.zeros(B), jnp.full(B, 2.0)))
  expected = np.zeros((H, W), np.uint8)
  expected[4:12, 4:12] = 1
  for i in range(B):
    np.testing.assert_array_equal(np.asarray(doubled['mask'][i]), expected)
  np.testing.assert_allclose(np.asarray(doubled['bbox']), [[4 / H, 4 / W, 12 / H, 12 / W]] * B,
                             atol=1e-6)
  # Shear by 45 degrees: x' = x + y, so the bottom row of the square moves right, the top left.
  sheared = augment.warp(centred, augment.affine_matrices(jnp.zeros(B), None, jnp.full(B, 45.0)))
  rows = np.asarray(sheared['mask'][0])
  assert np.nonzero(rows[9])[0].mean() - np.nonzero(rows[6])[0].mean() == pytest.approx(3.0)
  np.testing.assert_allclose(np.asarray(sheared['bbox'][0]), [6 / H, 4 / W, 10 / H, 12 / W],
                             atol=1e-6)
  small = augment.random_affine(jax.random.PRNGKey(0), batch, rotate=10.0, scale=0.2, shear=10.0)
  for i in range(B):  # the mapped corners' box contains the mapped rectangle
    tight, box = box_of(np.asarray(small['mask'][i])), np.asarray(small['bbox'][i])
    assert (box[:2] <= tight[:2] + 0.5 / H).all() and (box[2:] >= tight[2:] - 0.5 / H).all()


def test_elastic_field_has_simards_magnitude_and_is_smooth():
  field = np.asarray(augment.elastic_field(jax.random.PRNGKey(0), (64, 28, 28), 34.0, 4.0))
  assert field.shape == (64, 28, 28, 2)
  # rms of uniform(-1, 1) smoothed by a unit-sum 2-D Gaussian: alpha / sqrt(3) / (2 sqrt(pi) sigma)
  expected = 34.0 / np.sqrt(3.0) / (2.0 * np.sqrt(np.pi) * 4.0)
  interior = field[:, 12:16, 12:16]  # away from the border, where the truncated Gaussian is whole
  assert np.sqrt(np.mean(interior ** 2)) == pytest.approx(expected, rel=0.15)
  step = np.abs(np.diff(field, axis=1)).mean()  # neighbouring pixels move together
  assert step < 0.2 * np.abs(field).mean()
  batch = make_batch()
  moved = augment.random_affine(jax.random.PRNGKey(1), batch, elastic_alpha=34.0)
  assert not np.array_equal(np.asarray(moved['image']), np.asarray(batch['image']))
  assert_same(moved, batch, keys=('bbox',))  # no affine part: boxes stay


def test_cutout_zeroes_a_clipped_square_and_keeps_targets():
  batch = make_batch()
  batch['image'] = jnp.full_like(batch['image'], 200)
  cy = jnp.array([8, 0] * (B // 2), jnp.int32)
  out = augment.cutout(batch, cy, jnp.full(B, 8, jnp.int32), 4)
  zeroed = (np.asarray(out['image'])[..., 0] == 0).sum((1, 2))
  np.testing.assert_array_equal(zeroed, [16, 8] * (B // 2))  # the second square is half outside
  assert_same(out, batch, keys=('mask', 'bbox'))


def test_alternating_flip_alternates_between_epochs():
  batch = make_batch()
  batch['index'] = jnp.arange(64, dtype=jnp.int32)[:B]
  even = augment.alternating_flip(batch)
  odd = augment.alternating_flip({**batch, 'epoch': jnp.ones(B, jnp.int32)})
  flipped_even = np.array([not np.array_equal(e, x) for e, x in
                           zip(np.asarray(even['image']), np.asarray(batch['image']))])
  flipped_odd = np.array([not np.array_equal(o, x) for o, x in
                          zip(np.asarray(odd['image']), np.asarray(batch['image']))])
  np.testing.assert_array_equal(flipped_even, ~flipped_odd)
  assert 0 < flipped_even.sum() < B
  with pytest.raises(DataError, match="needs batch\\['index'\\]"):
    augment.alternating_flip({'image': batch['image']})


def test_mixup_blends_with_the_reversed_batch():
  batch = make_batch()
  assert_same(mixing.mixup(batch, jnp.ones(B)), batch, keys=('image',))
  half = mixing.mixup(batch, jnp.full(B, 0.5))
  expected = (np.asarray(batch['image'], np.float32) + np.asarray(batch['image'])[::-1]) / 2
  assert np.abs(np.asarray(half['image'], np.float32) - expected).max() <= 0.5
  np.testing.assert_array_equal(np.asarray(half['label_mix']), np.arange(B)[::-1])


def test_cutmix_weight_is_the_own_area_and_masks_follow():
  batch = make_batch()
  top, left = jnp.full(B, 4, jnp.int32), jnp.full(B, 2, jnp.int32)
  out = mixing.cutmix(batch, top, left, top + 4, left + 8)
  np.testing.assert_allclose(np.asarray(out['mix_weight']), 1 - 32 / (H * W))
  partner = np.asarray(batch['image'])[::-1]
  np.testing.assert_array_equal(np.asarray(out['image'])[:, 4:8, 2:10], partner[:, 4:8, 2:10])
  np.testing.assert_array_equal(np.asarray(out['mask'])[:, 4:8, 2:10],
                                np.asarray(batch['mask'])[::-1, 4:8, 2:10])
  np.testing.assert_array_equal(np.asarray(out['image'])[:, :4], np.asarray(batch['image'])[:, :4])


def test_normalize_and_its_config():
  images = jnp.array([[[[0, 255, 51]]]], jnp.uint8)  # (1, 1, 1, 3)
  out = augment.normalize(images, (0.0, 0.5, 0.2), (1.0, 0.5, 0.1), jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32).ravel(), [0.0, 1.0, 0.0], atol=1e-2)
  with pytest.raises(DataError, match='2 values for 3-channel'):
    augment.normalize(images, (0.1, 0.2), (1.0, 1.0))
  cfg = config.default_config()
  info = type('Info', (), {'name': 'x', 'image_shape': (8, 8, 1), 'mean': (0.3,), 'std': (0.2,)})
  assert augment.normalization(cfg, info) == ((0.3,), (0.2,))
  cfg.normalize = 'fixed'
  with pytest.raises(DataError, match='config.data.mean has 3 values but x images have 1'):
    augment.normalization(cfg, info)


@pytest.mark.parametrize('key, value, message', [
    ('flip', 'sideways', 'config.data.augment.flip must be one of'),
    ('crop_mode', 'wrap', 'config.data.augment.crop_mode'),
    ('translate', -1, 'config.data.augment.translate must be an int >= 0'),
    ('mixup_alpha', -0.1, 'config.data.augment.mixup_alpha must be >= 0'),
    ('scale', 1.0, r'config.data.augment.scale must be in \[0, 1\)'),
    ('shear', 90.0, 'config.data.augment.shear must be in'),
    ('elastic_alpha', -1.0, 'config.data.augment.elastic_alpha must be >= 0'),
    ('elastic_sigma', 0.0, 'config.data.augment.elastic_sigma must be > 0 pixels'),
])
def test_invalid_augment_config_names_the_key(key, value, message):
  cfg = {**config.augment_config().to_dict(), key: value}
  with pytest.raises(DataError, match=message):
    augment.apply(cfg, jax.random.PRNGKey(0), make_batch())

