"""Running a model to explain it: input checks, its named layers, and taps on a layer's output.

A layer is named by its module path (`stage2_conv1`, `stage3_block1/conv2`, the names the
checkpoint and `cnnlab summary` use) or by a value the model sows into 'intermediates' (`stage2`,
`pre_logits`). A sown value that is some module's output (the zoo's are) is also reachable by
Grad-CAM and the deconvnet, which need the gradient at it: they tap the module that made it.

`inspect` traces the model once, abstractly (`jax.make_jaxpr`: no FLOPs), to learn the output's
and every layer's shape, so that a bad layer name, target or image shape fails with a clear
ValueError before anything is computed.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.layers.common import RELU_BACKWARD, relu_backward


@dataclasses.dataclass(frozen=True)
class Layer:
  """A named layer: its output shape (batch first) and the module whose output it is (itself for
  a module; for a sown value the module that produced it, None when no module did)."""
  name: str
  shape: tuple[int, ...]
  dtype: Any
  module: str | None

  @property
  def spatial(self) -> bool:
    return len(self.shape) == 4


@dataclasses.dataclass(frozen=True)
class Inspection:
  """What one abstract trace of `model.apply(variables, images)` showed."""
  model: str
  output_shape: tuple[int, ...]
  layers: dict[str, Layer]  # in the order the forward pass finishes them
  stray_relus: int  # jax.nn.relu calls that bypass cnnlab.layers.relu (see relu_backward)

  @property
  def num_classes(self) -> int:
    return self.output_shape[-1]

  def describe(self, spatial_only: bool = False) -> str:
    """One line per layer: its name and output shape (B for the batch)."""
    rows = [(name, '(B, ' + ', '.join(map(str, layer.shape[1:])) + ')')
            for name, layer in self.layers.items() if layer.spatial or not spatial_only]
    width = max((len(n) for n, _ in rows), default=0)
    return '\n'.join(f'  {name.ljust(width)}  {shape}' for name, shape in rows)

  def layer(self, name: str, *, spatial: bool = False, tap: bool = False) -> Layer:
    """The layer called `name`; ValueError listing the layers (and their output shapes) unless it
    exists, is (B, h, w, C) when `spatial`, and is some module's output when `tap`."""
    if name not in self.layers:
      close = difflib.get_close_matches(name, self.layers, n=3)
      hint = f' Did you mean {" or ".join(map(repr, close))}?' if close else ''
      raise ValueError(f'{self.model} has no layer {name!r}.{hint} Its layers and output shapes:\n'
                       f'{self.describe(spatial_only=spatial)}')
    layer = self.layers[name]
    if spatial and not layer.spatial:
      raise ValueError(f'layer {name!r} of {self.model} outputs shape {layer.shape}, not a '
                       f'(B, h, w, C) feature map. Spatial layers:\n{self.describe(True)}')
    if tap and layer.module is None:
      raise ValueError(f'layer {name!r} of {self.model} is a value sown outside any module, so '
                       'its gradient cannot be reached; name the module that computes it')
    return layer


def _flatten_sown(tree, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
  """{'a/b': first value} for every sown tuple in an 'intermediates' collection."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, tuple):
      if value:
        out['/'.join(prefix + (key,))] = value[0]
    elif isinstance(value, dict) or hasattr(value, 'items'):
      out.update(_flatten_sown(value, prefix + (key,)))
  return out


def _is_jax_relu(eqn) -> bool:
  """Whether an equation is a call of jax.nn.relu: a custom_jvp_call wrapping jit[name=relu]."""
  if eqn.primitive.name != 'custom_jvp_call':
    return False
  inner = eqn.params.get('call_jaxpr')
  inner = getattr(inner, 'jaxpr', inner)
  return any(e.params.get('name') == 'relu' for e in getattr(inner, 'eqns', ()))


def _count_stray_relus(jaxpr) -> int:
  """jax.nn.relu calls outside any custom_vjp_call (the ones `cnnlab.layers.relu` makes under
  relu_backward): ReLUs the model calls directly, which `relu_backward` cannot reach."""
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name.startswith('custom_vjp_call'):
      continue
    if _is_jax_relu(eqn):
      count += 1
      continue
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else (param,)):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          count += _count_stray_relus(inner)
  return count


def _called(context) -> str | None:
  """The path of the module whose `__call__` the interceptor sees (None for other methods, such
  as those a module's __post_init__ calls before it is bound)."""
  if context.method_name != '__call__' or context.module.scope is None:
    return None
  return '/'.join(context.module.path)


def logits_of(outputs, model_name: str = 'the model') -> jax.Array:
  """The class logits (B, K) in a model's output: the output itself, or its 'logits' entry (a
  localization head's dict); ValueError for anything else (dense per-pixel logits, images)."""
  if isinstance(outputs, dict) and 'logits' in outputs:
    outputs = outputs['logits']
  if not isinstance(outputs, jax.Array) or outputs.ndim != 2:
    what = (f'a dict of {sorted(outputs)}' if isinstance(outputs, dict)
            else getattr(outputs, 'shape', None) or type(outputs).__name__)
    raise ValueError(f'{model_name} returns {what}; attribution methods explain class logits '
                     '(B, num_classes)')
  return outputs


def apply(model: nn.Module, variables, images: jax.Array, **kwargs):
  """model.apply in inference mode (batch norm's running statistics, no dropout)."""
  return model.apply(variables, images, train=False, **kwargs)


def logits(model: nn.Module, variables, images: jax.Array) -> jax.Array:
  """(B, K) class logits of `images` in inference mode."""
  return logits_of(apply(model, variables, images), type(model).__name__)


def inspect(model: nn.Module, variables, images, relu_mode: str = 'default') -> Inspection:
  """Traces `model.apply(variables, images, train=False)` abstractly under `relu_mode` and records
  the output shape and every named layer. Images that do not fit the model (channels, or a size
  its dense layers were not built for) raise ValueError naming their shape."""
  modules: dict[str, tuple[Any, tuple, Any]] = {}  # path -> (array, shape, dtype), first call
  found: dict[str, Any] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    path = _called(context)
    if path and path not in modules and isinstance(out, jax.Array):
      modules[path] = (out, tuple(out.shape), out.dtype)
    return out

  def run(variables, images):
    with relu_backward(relu_mode), nn.intercept_methods(interceptor):
      out, state = apply(model, variables, images, mutable=['intermediates'])
    producers = {id(array): path for path, (array, _, _) in modules.items()}
    found['sown'] = {name: (tuple(v.shape), v.dtype, producers.get(id(v)))
                     for name, v in _flatten_sown(state.get('intermediates', {})).items()
                     if isinstance(v, jax.Array)}
    found['output'] = out
    return out

  abstract = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
  name = type(model).__name__
  try:
    jaxpr = jax.make_jaxpr(run)(jax.tree.map(abstract, variables), abstract(images))
  except ValueError:
    raise
  except Exception as e:  # flax's shape errors, XLA's dot/conv dimension errors
    raise ValueError(f'images of shape {tuple(jnp.shape(images))} do not fit {name} with these '
                     f'variables: {type(e).__name__}: {e}') from e
  out = logits_of(found['output'], name)
  layers = {path: Layer(path, shape, dtype, path) for path, (_, shape, dtype) in modules.items()}
  for sown, (shape, dtype, producer) in found['sown'].items():
    layers.setdefault(sown, Layer(sown, shape, dtype, producer))
  return Inspection(name, tuple(out.shape), layers, _count_stray_relus(jaxpr.jaxpr))


def check(model: nn.Module, variables, images, target=None, *,
          relu_mode: str = 'default') -> tuple[jax.Array, jax.Array | None, Inspection]:
  """(images, target, inspection) after checking them: images (B, H, W, C) floating point (the
  model's normalised input), target (B,) integer class indices in [0, num_classes) (its values are
  checked when they are known, i.e. outside jit)."""
  if relu_mode not in RELU_BACKWARD:
    raise ValueError(f'relu backward mode must be one of {RELU_BACKWARD}, got {relu_mode!r}')
  images = images if isinstance(images, jax.Array) else jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f'images must be (B, H, W, C), got shape {tuple(images.shape)}')
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f'images must be floating point, normalised as the model was trained '
                     f'(LoadedRun.preprocess), got {images.dtype}')
  info = inspect(model, variables, images, relu_mode)
  if target is None:
    return images, None, info
  target = target if isinstance(target, jax.Array) else jnp.asarray(target)
  if target.shape != (images.shape[0],) or not jnp.issubdtype(target.dtype, jnp.integer):
    raise ValueError(f'target must be ({images.shape[0]},) integer class indices, one per image; '
                     f'got shape {tuple(target.shape)} {target.dtype}')
  try:
    values = np.asarray(target)
  except jax.errors.JAXTypeError:  # traced under jit: the values are not known yet
    return images, target, info
  bad = values[(values < 0) | (values >= info.num_classes)]
  if bad.size:
    raise ValueError(f'target {bad.tolist()} out of range: {info.model} has '
                     f'{info.num_classes} classes (0..{info.num_classes - 1})')
  return images, target, info


def list_layers(model: nn.Module, variables, images) -> dict[str, tuple[int, ...]]:
  """{name: output shape} of every named layer (module paths, then sown values), in the order
  the forward pass finishes them, from an abstract trace of `model.apply(variables, images)`."""
  _, _, info = check(model, variables, images)
  return {name: layer.shape for name, layer in info.layers.items()}


def target_scores(logits: jax.Array, target: jax.Array) -> jax.Array:
  """(B, K) logits, (B,) classes -> (B,) the target class's logit of each example."""
  return jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]


def apply_tapped(model: nn.Module, variables, images: jax.Array, module: str,
                 delta: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(logits, output of `module`'s first call); `delta` is added to that output before the rest
  of the network sees it, so the gradient with respect to `delta` (at 0) is the gradient with
  respect to the layer's output."""
  tapped: dict[str, jax.Array] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if 'out' not in tapped and _called(context) == module:
      tapped['out'] = out
      if delta is not None:
        out = out + delta
    return out

  with nn.intercept_methods(interceptor):
    out = logits(model, variables, images)
  return out, tapped['out']


def capture(model: nn.Module, variables, images: jax.Array, info: Inspection,
            names) -> dict[str, jax.Array]:
  """{name: that layer's output} for layers `names` (checked against `info`), from one forward
  pass: a module's first call, or the first value sown under a sown name."""
  wanted = {name: info.layer(name) for name in names}
  modules = {layer.module for layer in wanted.values() if layer.module}
  captured: dict[str, jax.Array] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    path = _called(context)
    if path in modules and path not in captured:
      captured[path] = out
    return out

  with nn.intercept_methods(interceptor):
    _, state = apply(model, variables, images, mutable=['intermediates'])
  sown = _flatten_sown(state.get('intermediates', {}))
  return {name: captured[layer.module] if layer.module else sown[name]
          for name, layer in wanted.items()}


def chunk_size(per_item: int, batch_size: int | None, items: int) -> int:
  """How many items (integration steps, occluded windows) one model evaluation takes: about
  `batch_size` images (default 256) of `per_item` each, at least 1, at most `items`."""
  budget = 256 if batch_size is None else batch_size
  if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
    raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')
  return int(max(1, min(items, budget // max(per_item, 1))))


def broadcast_baseline(baseline, images: jax.Array, what: str = 'baseline') -> jax.Array:
  """A scalar, (C,), (H, W, C) or (B, H, W, C) baseline as an array shaped like `images`."""
  value = jnp.asarray(baseline, images.dtype) if not isinstance(baseline, jax.Array) else (
      baseline.astype(images.dtype))
  try:
    return jnp.broadcast_to(value, images.shape)
  except ValueError:
    raise ValueError(f'{what} of shape {tuple(value.shape)} does not broadcast to the images '
                     f'{tuple(images.shape)}') from None


def static_ints(value, name: str, lengths) -> tuple[int, ...]:
  """An int (repeated to the first of `lengths`) or a sequence of ints whose length is one of
  `lengths`, each >= 1, as a tuple; ValueError naming `name` otherwise."""
  lengths = (lengths,) if isinstance(lengths, int) else tuple(lengths)
  is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
  values = (value,) * lengths[0] if is_int(value) else value
  try:
    values = tuple(values)
  except TypeError:
    values = ()
  if len(values) not in lengths or not all(is_int(v) and v >= 1 for v in values):
    counts = ' or '.join(map(str, lengths))
    raise ValueError(f'{name} must be a positive int or {counts} of them, got {value!r}')
  return tuple(int(v) for v in values)


__all__ = ['Layer', 'Inspection', 'inspect', 'check', 'list_layers', 'apply', 'logits',
           'logits_of', 'apply_tapped', 'capture', 'target_scores', 'chunk_size',
           'broadcast_baseline', 'static_ints']
