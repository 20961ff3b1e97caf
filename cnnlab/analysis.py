"""The arithmetic of a network made inspectable: output shapes, parameters, MACs, receptive fields.

`trace(model, input_shape)` runs `model.init` abstractly (`jax.eval_shape`: no FLOPs, no memory)
with a Flax method interceptor that sees every module call, and records one row per layer.
Receptive fields are computed analytically by composing each spatial window (kernel, stride,
padding, dilation) with `geometry.Field`; branches (Inception, residual shortcuts) are merged.

    >>> from cnnlab import analysis, models
    >>> print(analysis.summarize(models.create_model('resnet18'), (224, 224, 3)))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnlab import geometry, layers
from cnnlab.geometry import (Field, conv_output_size, conv_transpose_output_size,  # noqa: F401 (API)
                             pool_output_size, textbook_receptive_field)

# Modules shown as one row each; what runs inside them is folded into their row.
LAYER_TYPES = (layers.ConvBlock, layers.UpBlock, layers.Pool, layers.GlobalPool,
               layers.AdaptiveAvgPool, nn.Conv, nn.ConvTranspose, nn.Dense, layers.BatchNorm,
               nn.BatchNorm, nn.GroupNorm, nn.LayerNorm)


@dataclasses.dataclass
class Layer:
  """One row of a summary. Shapes exclude the batch; MACs are per example."""
  name: str
  kind: str
  input_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  params: int = 0
  macs: int = 0
  field: tuple[Field, Field] | None = None  # receptive field of the output map (H, W)

  @property
  def rf_size(self) -> tuple[float, float] | None:
    return None if self.field is None else (self.field[0].size, self.field[1].size)

  @property
  def rf_jump(self) -> tuple[float, float] | None:
    return None if self.field is None else (self.field[0].jump, self.field[1].jump)


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
  """A spatial layer's receptive field, per dim (H, W), in input pixels (see geometry.Field)."""
  name: str
  size: tuple[float, float]
  jump: tuple[float, float]
  start: tuple[float, float]


class _Tracer:
  """State of one trace: rows, fields by array identity, and the stack of open module calls."""

  def __init__(self):
    self.rows: list[Layer] = []
    self.fields: dict[int, tuple[Any, tuple[Field, Field] | None]] = {}
    self.current: tuple[Field, Field] | None = (Field(), Field())
    self.stack: list[dict] = []  # one frame per open call: produced fields, macs, is-layer

  def field_of(self, x) -> tuple[Field, Field] | None:
    entry = self.fields.get(id(x))
    return entry[1] if entry is not None and entry[0] is x else self.current

  def remember(self, x, field) -> None:
    if isinstance(x, jax.Array) or hasattr(x, 'shape'):
      self.fields[id(x)] = (x, field)  # keep x alive so its id is not reused
      self.current = field
      for frame in self.stack:
        frame['produced'].append((tuple(x.shape[1:3]) if x.ndim == 4 else None, field))

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or not args or not hasattr(args[0], 'shape'):
      return next_fun(*args, **kwargs)
    x = args[0]
    in_field = self.field_of(x)
    inside_layer = any(f['layer'] for f in self.stack)
    frame = {'produced': [], 'macs': 0, 'layer': isinstance(module, LAYER_TYPES)}
    self.stack.append(frame)
    try:
      y = next_fun(*args, **kwargs)
    finally:
      self.stack.pop()
    if not hasattr(y, 'shape'):
      return y
    macs = frame['macs'] + _own_macs(module, x, y)
    for parent in self.stack:
      parent['macs'] += _own_macs(module, x, y)
    field = _out_field(module, x, y, in_field, frame['produced'])
    self.remember(y, field)
    if self.stack and not inside_layer and frame['layer']:
      self.rows.append(Layer(layer_path(module), _kind(module), tuple(x.shape[1:]),
                             tuple(y.shape[1:]), _num_params(module), macs, field))
    elif (self.stack and not inside_layer and field is not None and self.rows
          and self.rows[-1].field is not None and not _same(field, self.rows[-1].field)):
      # A block whose branches merge (Inception, residual add): its own, merged receptive field.
      self.rows.append(Layer(layer_path(module), 'merge', tuple(x.shape[1:]), tuple(y.shape[1:]),
                             0, 0, field))
    return y


def layer_path(module: nn.Module) -> str:
  return '/'.join(module.path)


def _kind(module: nn.Module) -> str:
  if isinstance(module, layers.Pool):
    return f'{module.kind}_pool'
  if isinstance(module, layers.GlobalPool):
    return f'global_{module.kind}_pool'
  return type(module).__name__


def _num_params(module: nn.Module) -> int:
  params = module.variables.get('params', {})
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def _own_macs(module: nn.Module, x, y) -> int:
  """Multiply-accumulates of a primitive module, per example."""
  if isinstance(module, nn.ConvTranspose):
    k = math.prod(module.kernel_size)
    return int(math.prod(x.shape[1:-1]) * x.shape[-1] * k * y.shape[-1])
  if isinstance(module, nn.Conv):
    k = math.prod(module.kernel_size)
    return int(math.prod(y.shape[1:]) * k * x.shape[-1] // module.feature_group_count)
  if isinstance(module, nn.Dense):
    return int(math.prod(y.shape[1:]) * x.shape[-1])
  return 0


def _windows(module: nn.Module, x) -> list[tuple[int, int, int, int]] | None:
  """(kernel, stride, pad_lo, dilation) per spatial dim of a primitive window, else None."""
  if isinstance(module, nn.ConvTranspose):
    return None
  if isinstance(module, nn.Conv):
    dilation = module.kernel_dilation or (1, 1)
    strides = module.strides or (1, 1)
    dilation = (dilation,) * 2 if isinstance(dilation, int) else dilation
    strides = (strides,) * 2 if isinstance(strides, int) else strides
    pads = [geometry.resolve_padding(geometry.padding_for_dim(module.padding, i)
                                     if not isinstance(module.padding, str) else module.padding,
                                     module.kernel_size[i], strides[i], dilation[i], x.shape[1 + i])
            for i in range(2)]
    return [(module.kernel_size[i], strides[i], pads[i][0], dilation[i]) for i in range(2)]
  if isinstance(module, layers.Pool):
    return [(w, s, lo, 1) for w, s, (lo, _), _ in module.geometry(x.shape[1:3])]
  return None


def _out_field(module, x, y, in_field, produced):
  if y.ndim != 4:
    return None
  if in_field is None or isinstance(module, nn.ConvTranspose):
    return None  # transposed convolutions have no single-window receptive field
  windows = _windows(module, x)
  if windows is not None:
    return tuple(f.then(*w) for f, w in zip(in_field, windows))
  if isinstance(module, layers.AdaptiveAvgPool):
    out = []
    for f, n, o in zip(in_field, x.shape[1:3], y.shape[1:3]):
      window = max(-(-((i + 1) * n) // o) - (i * n) // o for i in range(o))  # its largest window
      out.append(Field(f.size + (window - 1) * f.jump, f.jump * n / o,
                       f.start + (window - 1) / 2 * f.jump))
    return tuple(out)
  same_grid = [f for shape, f in produced if shape == tuple(y.shape[1:3]) and f is not None]
  if same_grid:  # a composite: the union of what its children produced on the output grid
    return tuple(Field.union([f[i] for f in same_grid]) for i in range(2))
  return in_field if tuple(x.shape[1:3]) == tuple(y.shape[1:3]) else None


def _same(a, b) -> bool:
  return all(math.isclose(getattr(p, k), getattr(q, k)) for p, q in zip(a, b)
             for k in ('size', 'jump', 'start'))


def trace(model: nn.Module, input_shape: Sequence[int], *, train: bool = False) -> list[Layer]:
  """Per-layer rows of `model` on one (H, W, C) input, computed abstractly with jax.eval_shape."""
  tracer = _Tracer()
  x = jnp.zeros((1, *input_shape), jnp.float32)
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}

  def init():
    tracer.remember(x, (Field(), Field()))
    with nn.intercept_methods(tracer):
      return model.init(rngs, x, train=train)

  jax.eval_shape(init)
  return tracer.rows


def receptive_field(model: nn.Module, input_shape: Sequence[int]) -> list[ReceptiveField]:
  """Receptive field of every spatial layer, in order; the last record is the network's
  (the map that global pooling or flattening consumes). Computed analytically."""
  records = [ReceptiveField(r.name, r.rf_size, r.rf_jump, (r.field[0].start, r.field[1].start))
             for r in trace(model, input_shape) if r.field is not None and len(r.output_shape) == 3
             and r.kind not in ('BatchNorm', 'GroupNorm', 'LayerNorm')]
  if not records:
    raise ValueError(f'{type(model).__name__} has no spatial layers with a receptive field')
  return records


@dataclasses.dataclass
class Summary:
  """A model's per-layer table with totals; `str()` renders it."""
  model: str
  input_shape: tuple[int, ...]
  layers: list[Layer]
  total_params: int
  total_macs: int

  @property
  def receptive_field(self) -> tuple[float, float] | None:
    spatial = [r for r in self.layers if r.field is not None and len(r.output_shape) == 3]
    return spatial[-1].rf_size if spatial else None

  def as_dict(self) -> dict[str, Any]:
    return {'model': self.model, 'input_shape': list(self.input_shape),
            'total_params': self.total_params, 'total_macs': self.total_macs,
            'receptive_field': self.receptive_field,
            'layers': [{'name': r.name, 'kind': r.kind, 'output_shape': list(r.output_shape),
                        'params': r.params, 'macs': r.macs, 'rf_size': r.rf_size,
                        'rf_jump': r.rf_jump} for r in self.layers]}

  def __str__(self) -> str:
    def fmt(v):
      if v is None:
        return ''
      h, w = (_num(a) for a in v)
      return h if h == w else f'{h}x{w}'
    head = ('layer', 'kind', 'output', 'params', 'MACs', 'RF', 'jump')
    rows = [(r.name, r.kind, 'x'.join(map(str, r.output_shape)), f'{r.params:,}', f'{r.macs:,}',
             fmt(r.rf_size), fmt(r.rf_jump)) for r in self.layers]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    line = lambda cells: '  '.join(str(c).ljust(w) if i < 3 else str(c).rjust(w)
                                    for i, (c, w) in enumerate(zip(cells, widths)))
    rule = '-' * len(line(head))
    rf = fmt(self.receptive_field) or 'n/a'
    return '\n'.join([f'{self.model} on {"x".join(map(str, self.input_shape))}', rule, line(head),
                      rule, *map(line, rows), rule,
                      f'total params: {self.total_params:,}   MACs/example: {self.total_macs:,} '
                      f'({_si(self.total_macs)})   receptive field: {rf}'])


def _si(v: float) -> str:
  """427,320 -> '427.3 K', 1,814,073,344 -> '1.814 G'."""
  for unit, scale in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
    if v >= scale:
      return f'{v / scale:.4g} {unit}'
  return str(v)


def _num(v: float) -> str:
  return str(int(v)) if float(v).is_integer() else f'{v:.2f}'


def summarize(model: nn.Module, input_shape: Sequence[int], *, name: str | None = None) -> Summary:
  """Per-layer table (name, output shape, parameters, MACs, receptive field size and jump)."""
  rows = trace(model, input_shape)
  return Summary(name or type(model).__name__, tuple(input_shape), rows,
                 sum(r.params for r in rows), sum(r.macs for r in rows))


def count_params(model: nn.Module, input_shape: Sequence[int]) -> int:
  """Number of parameters, from abstract shapes only."""
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  variables = jax.eval_shape(lambda x: model.init(rngs, x, train=False), x)
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(variables.get('params', {}))))
