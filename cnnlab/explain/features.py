"""What the layers hold and see: filters, feature maps, the patches that excite a channel most
(Zeiler & Fergus 2013) and the receptive field of one unit, measured against the analytic one."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnlab import analysis, geometry
from cnnlab.explain import probe
from cnnlab.layers.common import relu_backward

Box = tuple[int, int, int, int]  # (top, left, bottom, right) pixels, inclusive; may leave the image


def kernels(tree, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
  """{'a/b': kernel} for every 4-D 'kernel' parameter under `tree`, keyed by its module's path."""
  out = {}
  for key, value in tree.items():
    if hasattr(value, 'items'):
      out.update(kernels(value, prefix + (key,)))
    elif key == 'kernel' and getattr(value, 'ndim', 0) == 4:
      out['/'.join(prefix)] = value
  return out


def filters(variables, layer: str) -> jax.Array:
  """The convolution kernel of `layer`: (kh, kw, C_in / groups, C_out), filter k is [..., k].

  layer: the convolution's module path (`stage1_conv1/conv`) or any module holding exactly one
  convolution (`stage1_conv1`, a ConvBlock). An unknown name lists the convolutions.
  """
  every = kernels(variables.get('params', variables))
  found = {path: k for path, k in every.items() if path == layer or path.startswith(layer + '/')}
  if len(found) != 1:
    listing = '\n'.join(f'  {path}  {tuple(k.shape)}' for path, k in every.items())
    what = 'no convolution' if not found else f'{len(found)} convolutions'
    raise ValueError(f'layer {layer!r} holds {what}; name one of these (kernel shapes '
                     f'kh, kw, C_in, C_out):\n{listing}')
  return next(iter(found.values()))


def feature_maps(model: nn.Module, variables, images, layers: str | Sequence[str]
                 ) -> dict[str, jax.Array]:
  """{layer: its output on `images`} for module paths or sown names (B, h, w, C for spatial
  layers), from one forward pass in inference mode. An unknown name lists the layers."""
  names = [layers] if isinstance(layers, str) else list(layers)
  images, _, info = probe.check(model, variables, images)
  return probe.capture(model, variables, images, info, names)


# ---- receptive fields ----

def analytic_field(model: nn.Module, input_shape: Sequence[int],
                   module: str) -> tuple[geometry.Field, geometry.Field]:
  """The receptive field of `module`'s output on (H, W, C) inputs, as `cnnlab.analysis` computes
  it: its own row of the summary; for a block without one (its merged field equals its last
  row's) the last row inside it; for a module inside a row (a ConvBlock's conv) that row's."""
  rows = analysis.trace(model, tuple(input_shape))
  inside = [r for r in rows if r.name == module or r.name.startswith(module + '/')]
  around = [r for r in rows if module.startswith(r.name + '/')]
  row = inside[-1] if inside else (around[-1] if around else None)
  if row is None or row.field is None:
    raise ValueError(f'cnnlab.analysis has no receptive field for layer {module!r} (a transposed '
                     'convolution, or no spatial layer inside it)')
  return row.field


def unit_box(field: tuple[geometry.Field, geometry.Field], position: Sequence[int]) -> Box:
  """The input pixels unit (i, j) of a map with `field` sees: (top, left, bottom), inclusive."""
  lo_hi = []
  for f, i in zip(field, position[:2]):
    centre, half = f.start + i * f.jump, (f.size - 1) / 2
    lo_hi.append((int(round(centre - half)), int(round(centre + half))))
  (top, bottom), (left, right) = lo_hi
  return top, left, bottom, right


def crop(image: np.ndarray, box: Box, fill=0) -> np.ndarray:
  """image[top:bottom + 1, left:right + 1], padded with `fill` where the box leaves the image,
  so every crop of one layer has the receptive field's size and the unit at its centre."""
  top, left, bottom, right = box
  height, width = image.shape[:2]
  out = np.full((bottom - top + 1, right - left + 1, *image.shape[2:]), fill, image.dtype)
  t, l, b, r = max(top, 0), max(left, 0), min(bottom, height - 1), min(right, width - 1)
  if t <= b and l <= r:
    out[t - top:b - top + 1, l - left:r - left + 1] = image[t:b + 1, l:r + 1]
  return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _unit_gradient(model, module, variables, images, mask):
  """(H, W): mean over the images of |d sum(mask * module's output) / d input|, summed over
  channels."""
  def unit(x):
    return jnp.sum(probe.apply_tapped(model, variables, x, module)[1] * mask)
  return jnp.mean(jnp.abs(jax.grad(unit)(images)), axis=0).sum(-1)


class ReceptiveFieldMap(NamedTuple):
  """gradient: (H, W) mean |d unit / d input| over the images, summed over channels (the
  empirical receptive field); box: the analytic field's pixels (top, left, bottom, right),
  inclusive, possibly beyond the image; support: the box around the nonzero gradient (None if
  the unit was never active); field: the analytic (H, W) geometry.Field."""
  layer: str
  position: tuple[int, ...]
  gradient: np.ndarray
  box: Box
  support: Box | None
  field: tuple[geometry.Field, geometry.Field]


def receptive_field_map(model: nn.Module, variables, layer: str, position: Sequence[int], *,
                        images=None, input_shape: Sequence[int] | None = None, num: int = 16,
                        seed: int = 0) -> ReceptiveFieldMap:
  """The empirical receptive field of one unit of `layer`, beside its analytic box.

  position: (i, j) in the layer's (h, w) grid (the unit summed over channels) or (i, j, c).
  images: (B, H, W, C) normalised inputs over which |gradient| is averaged; by default `num`
  standard-normal images of `input_shape` (seeded), as in Luo et al. 2016's effective field.
  """
  if images is None:
    if input_shape is None:
      raise ValueError('receptive_field_map needs images or input_shape (H, W, C)')
    images = jax.random.normal(jax.random.key(seed), (num, *input_shape), jnp.float32)
  images, _, info = probe.check(model, variables, images)
  target = info.layer(layer, spatial=True, tap=True)
  position = tuple(int(p) for p in position)
  limits = target.shape[1:] if len(position) == 3 else target.shape[1:3]
  if len(position) not in (2, 3) or any(not 0 <= p < n for p, n in zip(position, limits)):
    raise ValueError(f'position {position} is outside layer {layer!r}, whose output is '
                     f'{target.shape[1:]} (h, w, C): give (i, j) or (i, j, c) within it')

  # The unit as a 0/1 mask over the layer's output (a traced argument: one compilation serves
  # every position).
  mask = np.zeros(target.shape[1:], np.float32)
  mask[position[0], position[1], position[2] if len(position) == 3 else slice(None)] = 1.0
  gradient = np.asarray(_unit_gradient(model, target.module, variables, images,
                                       jnp.asarray(mask, target.dtype)), np.float64)
  field = analytic_field(model, images.shape[1:], target.module)
  rows, cols = np.nonzero(gradient)
  support = None if rows.size == 0 else (int(rows.min()), int(cols.min()), int(rows.max()),
                                         int(cols.max()))
  return ReceptiveFieldMap(layer, position, gradient, unit_box(field, position), support, field)


# ---- top activations ----

@dataclasses.dataclass
class TopActivations:
  """The k examples whose strongest unit of `channel` at `layer` is strongest, best first.

  index: (k,) in the dataset; value: (k,) the activation; position: (k, 2) the unit (i, j);
  label: (k,) or None; images: (k, H, W, C) uint8; boxes: the units' analytic receptive fields
  (top, left, bottom, right), inclusive; patches: (k, rh, rw, C) uint8, the images cropped to
  those boxes (zero where a box leaves the image); projections: (k, H, W, C) the deconvnet
  projection of each unit to the input (its other activations set to zero); projection_patches:
  the same crops of those.
  """
  layer: str
  channel: int
  index: np.ndarray
  value: np.ndarray
  position: np.ndarray
  label: np.ndarray | None
  images: np.ndarray
  boxes: list[Box]
  patches: np.ndarray
  projections: np.ndarray
  projection_patches: np.ndarray
  field: tuple[geometry.Field, geometry.Field]


def _strongest(model, variables, layer: str, info, channel: int):
  """jitted images -> (value (B,), flat position (B,)) of each image's strongest unit of
  `channel` at `layer`."""
  @jax.jit
  def run(variables, images):
    out = probe.capture(model, variables, images, info, [layer])[layer][..., channel]
    flat = out.reshape((out.shape[0], -1))
    return jnp.max(flat, axis=1), jnp.argmax(flat, axis=1)
  return lambda images: run(variables, images)


@functools.partial(jax.jit, static_argnums=(0, 3))
def deconvnet_projection(model: nn.Module, variables, images: jax.Array, module: str,
                         units: jax.Array) -> jax.Array:
  """Zeiler & Fergus's projection: each image's unit (i, j, c) of `module`'s output keeps its
  activation, every other is set to zero, and that map goes back down the deconvnet.
  units: (B, 3) ints. (B, H, W, C) -> (B, H, W, C)."""
  def layer_output(x):
    with relu_backward('deconvnet'):
      return probe.apply_tapped(model, variables, x, module)[1]
  out, pullback = jax.vjp(layer_output, images)
  b = jnp.arange(images.shape[0])
  i, j, c = units[:, 0], units[:, 1], units[:, 2]
  signal = jnp.zeros_like(out).at[b, i, j, c].set(out[b, i, j, c])
  return pullback(signal)[0]


def top_activations(run, layer: str, channel: int, dataset, k: int = 9, *, split: str = 'test',
                    limit: int | None = None, batch_size: int = 256) -> TopActivations:
  """The k dataset patches that excite `channel` of `layer` most (one per image, its strongest
  unit), each cropped to that unit's receptive field (cnnlab.analysis), beside its deconvnet
  projection.

  run: a LoadedRun (cnnlab.load_run). dataset: a dataset name (its `split`, the first `limit`
  examples; None: all) or uint8 images (N, H, W, C) at the run's input shape.
  """
  from cnnlab.data import examples
  geometry.check_positive('k', k)
  geometry.check_positive('batch_size', batch_size)
  if isinstance(dataset, str):
    chunks = ((c['image'], c['label']) for c in
              examples.iterate(run.config.data, run.image_shape, dataset, split, limit))
  else:
    array = np.asarray(dataset)
    if array.dtype != np.uint8 or array.shape[1:] != tuple(run.image_shape):
      raise ValueError(f'dataset images must be uint8 {(None, *run.image_shape)}, got '
                       f'{array.dtype} {array.shape}')
    chunks = iter([(array[:limit], None)])
  sample = run.preprocess(np.zeros((1, *run.image_shape), np.uint8))
  _, _, info = probe.check(run.model, run.variables, sample)
  target = info.layer(layer, spatial=True, tap=True)
  if not 0 <= channel < target.shape[-1]:
    raise ValueError(f'channel {channel} is outside layer {layer!r}, which has '
                     f'{target.shape[-1]} channels')
  strongest = _strongest(run.model, run.variables, layer, info, channel)
  positions, kept, seen = [], [], 0
  for images, chunk_labels in chunks:
    if not seen:  # a dataset smaller than a batch is evaluated at its own size
      batch_size = max(1, min(batch_size, len(images)))
    for start in range(0, len(images), batch_size):
      batch = images[start:start + batch_size]
      padded = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch.shape[1:]),
                                               batch.dtype)])  # one compiled shape
      value, flat = (np.asarray(a)[:len(batch)] for a in strongest(run.preprocess(padded)))
      positions.append(flat)
      # Keep only the running top k images on the host.
      kept.extend(zip(value.tolist(), range(seen + start, seen + start + len(batch)),
                      batch, chunk_labels[start:start + len(batch)] if chunk_labels is not None
                      else [None] * len(batch)))
      kept = sorted(kept, key=lambda t: (-t[0], t[1]))[:k]
    seen += len(images)
  if not kept:
    raise ValueError(f'{dataset} has no examples to rank')
  width = target.shape[2]
  flat_all = np.concatenate(positions)
  value = np.asarray([t[0] for t in kept], np.float64)
  index = np.asarray([t[1] for t in kept])
  position = np.stack([np.divmod(int(flat_all[i]), width) for i in index])
  images = np.stack([t[2] for t in kept])
  label = None if kept[0][3] is None else np.asarray([t[3] for t in kept])
  units = np.concatenate([position, np.full((len(kept), 1), channel)], axis=1)
  projections = np.asarray(deconvnet_projection(run.model, run.variables, run.preprocess(images),
                                                target.module, jnp.asarray(units, jnp.int32)))
  field = analytic_field(run.model, run.image_shape, target.module)
  boxes = [unit_box(field, p) for p in position]
  return TopActivations(
      layer, channel, index, value, position, label, images, boxes,
      np.stack([crop(im, box) for im, box in zip(images, boxes)]), projections,
      np.stack([crop(p, box) for p, box in zip(projections, boxes)]), field)


__all__ = ['kernels', 'filters', 'feature_maps', 'analytic_field', 'unit_box', 'crop', 'ReceptiveFieldMap',
           'receptive_field_map', 'TopActivations', 'top_activations', 'deconvnet_projection']
