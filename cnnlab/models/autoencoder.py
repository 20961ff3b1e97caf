"""A convolutional (denoising) autoencoder, and the classifier on its encoder.

conv_autoencoder and conv_encoder build the same `Encoder` as their submodule 'encoder', so a
trained autoencoder's encoder drops into the classifier for linear probes and fine-tuning:

    params = {**classifier_params, 'encoder': autoencoder_params['encoder']}
    (and the same for batch_stats)
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax

from cnnlab import geometry
from cnnlab.layers import (NORMS, ConvBlock, GlobalPool, Pool, UpBlock, activation, as_logits,
                           check_choice)
from cnnlab.models.registry import check_num_classes, register

DOWNSAMPLES = ('stride', 'pool')


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape((x.shape[0], -1))


def _check_coder(module) -> None:
  """The checks the autoencoder and the classifier share (their encoder's fields)."""
  if not module.features:
    raise ValueError('features must name at least one level')
  for f in module.features:
    geometry.check_positive('features', f)
  check_choice('downsample', module.downsample, DOWNSAMPLES)
  geometry.check_positive('kernel_size', module.kernel_size)
  if module.kernel_size % 2 == 0:
    raise ValueError(f'kernel_size must be odd, so that the decoder mirrors every level exactly; '
                     f'got {module.kernel_size}')
  if module.code_dim is not None:
    geometry.check_positive('code_dim', module.code_dim)
  check_choice('norm', module.norm, NORMS)
  activation(module.act)


class Encoder(nn.Module):
  """Level i halves H and W (rounding up) with features[i] channels: a stride-2 ConvBlock
  'stage{i}_conv' (downsample='stride'), or a stride-1 ConvBlock and 2x2 max pooling 'stage{i}_pool'
  in ceil mode (downsample='pool'). With `code_dim`, a dense layer 'code' maps the flattened last
  map to the code. Input (B, H, W, C) -> (code: (B, h, w, features[-1]) or (B, code_dim),
  [level i's map (B, H_i, W_i, features[i]) for each level]).
  """
  features: Sequence[int] = (32, 64)
  downsample: str = 'stride'
  kernel_size: int = 3
  code_dim: int | None = None
  norm: str = 'batch'
  act: str = 'relu'
  dtype: Any = None
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, list[jax.Array]]:
    maps = []
    for i, features in enumerate(self.features, start=1):
      stride = 2 if self.downsample == 'stride' else 1
      x = ConvBlock(features, self.kernel_size, stride, norm=self.norm, act=self.act,
                    dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                    name=f'stage{i}_conv')(x, train)
      if self.downsample == 'pool':
        # Ceil mode: ceil(n / 2) like the SAME strided convolution, which the decoder inverts.
        x = Pool('max', 2, ceil_mode=True, name=f'stage{i}_pool')(x)
      maps.append(x)
    if self.code_dim is None:
      return x, maps
    return nn.Dense(self.code_dim, dtype=self.dtype, name='code')(_flatten(x)), maps


class Decoder(nn.Module):
  """The encoder's mirror: with a dense code, a dense layer 'expand' (and activation) back to the
  last level's map; then per level, deepest first, a stride-2 transposed convolution 'up{i}'
  (ConvBlock-like UpBlock with norm and activation) to the previous level's channels and size;
  a final convolution 'out' (no norm or activation) to the output channels.
  """
  features: Sequence[int] = (32, 64)
  kernel_size: int = 3
  norm: str = 'batch'
  act: str = 'relu'
  dtype: Any = None
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, code: jax.Array, sizes: Sequence[tuple[int, int]],
               code_map: tuple[int, int, int], out_channels: int, train: bool = False) -> jax.Array:
    """code (B, h, w, C) or (B, D); sizes: (H_i, W_i) of the input and of every level's map;
    code_map: the (h, w, C) of the last level's map. -> (B, H, W, out_channels)."""
    x = code
    if x.ndim == 2:
      x = nn.Dense(code_map[0] * code_map[1] * code_map[2], dtype=self.dtype, name='expand')(x)
      x = activation(self.act)(x).reshape((x.shape[0], *code_map))
    k = self.kernel_size
    for i in reversed(range(1, len(self.features) + 1)):
      n, target = sizes[i], sizes[i - 1]
      # Kernel k, stride 2, padding (k - 1) / 2 gives 2n - 1 cells; output padding adds the
      # one cell an even size lost to the encoder's rounding up.
      output_padding = tuple(t - (2 * m - 1) for t, m in zip(target, n))
      features = self.features[max(i - 2, 0)]
      x = UpBlock(features, k, 2, (k - 1) // 2, output_padding=output_padding, norm=self.norm,
                  act=self.act, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                  name=f'up{i}')(x, train)
    return ConvBlock(out_channels, k, norm='none', act='none', dtype=self.dtype,
                     name='out')(x, train)


@register('conv_autoencoder', input_shape=(28, 28, 1), num_classes=0, task='reconstruction')
class ConvAutoencoder(nn.Module):
  """A convolutional autoencoder: Encoder 'encoder' to a code, Decoder 'decoder' back to pixel
  logits (a sigmoid gives the 0..1 image). The code is sown into 'intermediates' as 'code';
  `encode` gives it as a vector. On 28x28x1 with the defaults: 28 -> 14 -> 7 (a 7x7x64 code) -> 14
  -> 28.

  Attributes:
    features: channels per encoder level (the decoder mirrors them).
    downsample: 'stride' (stride-2 convolutions) | 'pool' (convolution + 2x2 max pooling).
    kernel_size: odd, of every convolution.
    code_dim: None keeps the conv map as the code; an int adds a dense bottleneck of that size.
    out_channels: channels of the output (None: the input's).
    noise_std: standard deviation of the Gaussian noise added to the (normalised) input in
      training only, from the 'dropout' rng stream (a denoising autoencoder); 0 adds none.
    norm, act, dtype (compute), bn_axis_name (pmap's batch-norm axis).
  Input (B, H, W, C) -> pixel logits (B, H, W, out_channels or C), float32.
  """
  features: Sequence[int] = (32, 64)
  downsample: str = 'stride'
  kernel_size: int = 3
  code_dim: int | None = None
  out_channels: int | None = None
  noise_std: float = 0.0
  norm: str = 'batch'
  act: str = 'relu'
  dtype: Any = None
  bn_axis_name: str | None = None

  def __post_init__(self):
    _check_coder(self)
    if self.out_channels is not None:
      geometry.check_positive('out_channels', self.out_channels)
    if not self.noise_std >= 0:
      raise ValueError(f'noise_std must be >= 0, got {self.noise_std}')
    super().__post_init__()

  def setup(self):
    # Submodules in setup, so that `encode` and `__call__` share them.
    self.encoder = Encoder(self.features, self.downsample, self.kernel_size, self.code_dim,
                           self.norm, self.act, self.dtype, self.bn_axis_name)
    self.decoder = Decoder(self.features, self.kernel_size, self.norm, self.act, self.dtype,
                           self.bn_axis_name)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Images (B, H, W, C) -> pixel logits (B, H, W, out_channels or C)."""
    if train and self.noise_std > 0:
      noise = jax.random.normal(self.make_rng('dropout'), x.shape, x.dtype)
      x = x + self.noise_std * noise
    code, maps = self.encoder(x, train)
    self.sow('intermediates', 'code', code)
    sizes = [tuple(x.shape[1:3])] + [tuple(m.shape[1:3]) for m in maps]
    out = self.decoder(code, sizes, tuple(maps[-1].shape[1:]), self.out_channels or x.shape[-1],
                       train)
    return as_logits(out)

  def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Images (B, H, W, C) -> the code as a vector (B, D): the dense code, or the code map
    flattened (as conv_encoder with head='flatten' and num_classes=0 gives it).

    model.apply(variables, images, method='encode')."""
    code, _ = self.encoder(x, train)
    return code if code.ndim == 2 else _flatten(code)


@register('conv_encoder', input_shape=(28, 28, 1), num_classes=10)
class ConvEncoder(nn.Module):
  """A classifier on conv_autoencoder's encoder: the Encoder 'encoder', the code as a vector
  (flattened, or global-average pooled with head='global_avg'; a dense code as it is), a dense
  classifier 'head'. Its params['encoder'] has the autoencoder's structure for the same encoder
  fields, so a trained autoencoder's encoder can be copied in (see the module docstring).

  Attributes:
    features, downsample, kernel_size, code_dim, norm, act, dtype, bn_axis_name: as for
      conv_autoencoder (the encoder's).
    head: 'flatten' | 'global_avg' (how a conv-map code becomes a vector).
    num_classes: 0 returns the code vector (B, D), no classifier: timm's backbone convention.
    features_only: return the levels' maps [(B, H_i, W_i, features[i]), ...] instead.
  Input (B, H, W, C) -> logits (B, num_classes).
  """
  num_classes: int = 10
  features: Sequence[int] = (32, 64)
  downsample: str = 'stride'
  kernel_size: int = 3
  code_dim: int | None = None
  head: str = 'flatten'
  norm: str = 'batch'
  act: str = 'relu'
  dtype: Any = None
  bn_axis_name: str | None = None
  features_only: bool = False

  def __post_init__(self):
    _check_coder(self)
    check_choice('head', self.head, ('flatten', 'global_avg'))
    check_num_classes(self.num_classes, zero_ok=True)
    super().__post_init__()

  def feature_reductions(self) -> list[int]:
    """Each level's stride relative to the input (timm's feature_info.reduction())."""
    return [2 ** i for i in range(1, len(self.features) + 1)]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | list[jax.Array]:
    """Images (B, H, W, C) -> logits (B, num_classes); see num_classes and features_only."""
    encoder = Encoder(self.features, self.downsample, self.kernel_size, self.code_dim, self.norm,
                      self.act, self.dtype, self.bn_axis_name, name='encoder')
    code, maps = encoder(x, train)
    for i, m in enumerate(maps, start=1):
      self.sow('intermediates', f'stage{i}', m)
    if self.features_only:
      return maps
    if code.ndim == 4:
      flat = self.head == 'flatten'
      code = _flatten(code) if flat else GlobalPool('avg', name='global_pool')(code)
    self.sow('intermediates', 'pre_logits', code)
    if self.num_classes == 0:
      return code
    return as_logits(nn.Dense(self.num_classes, dtype=self.dtype, name='head')(code))
