"""The model registry: a name -> a Flax module factory.

Add an architecture in your own file, without editing cnnlab:

    from cnnlab.models import register

    @register('my_net', input_shape=(32, 32, 3))
    class MyNet(nn.Module):
      num_classes: int = 10
      @nn.compact
      def __call__(self, x, train: bool = False): ...

and name it in a config (`config.model.name = 'my_net'`, with the module listed in
`config.model.imports` so it is imported first). Variants of a family are one-line partials:

    register('resnet18', input_shape=(224, 224, 3))(partial(ResNet, stage_sizes=(2, 2, 2, 2), ...))

Every model is called as `model.apply(variables, images, train=bool, rngs=...)` with NHWC images
(B, H, W, C) and returns what its `task` (registered with it) reads:

  classification   logits (B, num_classes)
  segmentation     per-pixel logits (B, H, W, num_classes) at the input resolution, float32
  localization     {'logits': (B, num_classes), 'box': (B, 4)}, the box (ymin, xmin, ymax, xmax)
                   in [0, 1] with min <= max
  reconstruction   pixel logits (B, H, W, C) (a sigmoid gives the 0..1 image)
  detection        train=False: {'boxes': (B, D, 4) in [0, 1], 'scores': (B, D), 'labels': (B, D),
                   'num_detections': (B,)}, D fixed; train=True (with `targets`, the batch's boxes
                   and labels, and a 'sample' rng): the RPN's and box head's outputs and their
                   sampled targets (cnnlab.models.faster_rcnn)

Per-stage features and auxiliary logits are `sow`n into the 'intermediates' collection.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

# What a model's output is for (see the module docstring for each one's output).
from cnnlab.tasks.names import TASK_NAMES as TASKS




@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A registered model: its factory, the input it was designed for (H, W, C), its natural number
  of classes (0 for a reconstruction model, which has none) and the task its output fits."""
  name: str
  factory: Callable[..., nn.Module]
  input_shape: tuple[int, int, int]
  num_classes: int
  task: str = 'classification'

  @property
  def fields(self) -> dict[str, Any]:
    """The settable arguments (dataclass fields) of the module with their registered defaults."""
    cls, bound = _unwrap(self.factory)
    out = {f.name: f.default for f in dataclasses.fields(cls)
           if f.name not in ('parent', 'name') and f.init}
    out.update(bound)
    return out


_REGISTRY: dict[str, ModelSpec] = {}


def _unwrap(factory) -> tuple[type, dict[str, Any]]:
  bound: dict[str, Any] = {}
  while isinstance(factory, functools.partial):
    bound = {**factory.keywords, **bound}
    factory = factory.func
  return factory, bound


def register(name: str, *, input_shape: Sequence[int] = (224, 224, 3), num_classes: int = 1000,
             task: str = 'classification'):
  """Decorator registering a Flax module class (or a partial of one) under `name`.

  `input_shape` (H, W, C) and `num_classes` record the natural setting, used by tests,
  `cnnlab summary` and benchmarks; the model itself takes any size its layers allow. `task` (one of
  TASKS) is what the model's output is for, which fixes its shape (see the module docstring).
  """
  if task not in TASKS:
    raise ValueError(f'register({name!r}): task must be one of {TASKS}, got {task!r}')
  def decorator(factory):
    cls, _ = _unwrap(factory)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
      raise TypeError(f'register({name!r}) needs a flax.linen.Module class or a partial of one, got {cls!r}')
    if name in _REGISTRY and _REGISTRY[name].factory is not factory:
      raise ValueError(f'model {name!r} is already registered (by {_REGISTRY[name].factory!r})')
    _REGISTRY[name] = ModelSpec(name, factory, tuple(input_shape), num_classes, task)
    return factory
  return decorator


def check_num_classes(value: int, *, zero_ok: bool = False) -> None:
  """ValueError unless `num_classes` is an int >= 1, or >= 0 with `zero_ok` (a backbone's
  num_classes=0, timm's convention: the pooled features instead of logits)."""
  least = 0 if zero_ok else 1
  if isinstance(value, bool) or not isinstance(value, int) or value < least:
    hint = ' (0: pooled features, no classifier)' if zero_ok else ''
    raise ValueError(f'num_classes must be an int >= {least}{hint}, got {value!r}')


def list_models() -> list[str]:
  """Names of all registered models, sorted."""
  return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, _REGISTRY, n=3)
    hint = f' Did you mean {", ".join(map(repr, close))}?' if close else ''
    raise ValueError(f'unknown model {name!r}.{hint} Available models: {", ".join(list_models())}. '
                     'A model registered in your own module needs that module imported first: '
                     'config.model.imports = (\'my_models\',), or `cnnlab summary --import my_models`')
  return _REGISTRY[name]


def create_model(name: str, **overrides) -> nn.Module:
  """An instance of the registered model `name`, with module fields overridden by `overrides`.

  Unknown overrides raise ValueError naming the argument and listing the valid ones.
  """
  spec = get_spec(name)
  fields = spec.fields
  for key in overrides:
    if key not in fields:
      close = difflib.get_close_matches(key, fields, n=1)
      hint = f' Did you mean {close[0]!r}?' if close else ''
      raise ValueError(f'model {name!r} has no argument {key!r}.{hint} '
                       f'Its arguments: {", ".join(sorted(fields))}')
  return spec.factory(**overrides)


def import_modules(modules: Sequence[str]) -> None:
  """Imports user modules whose `@register` calls add models (config.model.imports)."""
  for module in modules:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ValueError(f'cannot import model module {module!r} (config.model.imports): {e}; it is '
                       'looked for beside the experiment file, in the current directory and on '
                       'PYTHONPATH') from e


# Compute dtypes by their config name (`config.dtype`).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def model_kwargs(model_config) -> dict[str, Any]:
  """The model's arguments from a config's `model` section: every key but those cnnlab reads
  itself (`name`, `imports`), and `num_classes` only when it is set."""
  kwargs = {k: v for k, v in model_config.to_dict().items() if k not in ('name', 'imports')}
  if kwargs.get('num_classes') is None:
    kwargs.pop('num_classes', None)
  return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def from_config(config, num_classes: int, axis_name: str | None = None) -> nn.Module:
  """The model a config describes (`config.model`, importing `config.model.imports` first), with
  `num_classes` (not for a reconstruction model without classes), the compute dtype
  (`config.dtype`) and pmap's batch-norm axis where the model takes them."""
  import_modules(config.model.imports)
  spec = get_spec(config.model.name)
  fields = spec.fields
  kwargs = model_kwargs(config.model)
  if spec.task != 'reconstruction' or 'num_classes' in fields:
    kwargs['num_classes'] = num_classes
  if 'dtype' in fields and 'dtype' not in kwargs:
    kwargs['dtype'] = DTYPES[config.dtype]
  if axis_name and 'bn_axis_name' in fields:
    kwargs['bn_axis_name'] = axis_name
  return create_model(config.model.name, **kwargs)


__all__ = ['register', 'create_model', 'list_models', 'get_spec', 'import_modules', 'ModelSpec',
           'TASKS', 'DTYPES', 'model_kwargs', 'from_config', 'check_num_classes']
