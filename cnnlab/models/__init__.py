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
and returns logits (B, num_classes); per-stage features and auxiliary logits are `sow`n into the
'intermediates' collection.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
from typing import Any, Callable, Sequence

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A registered model: its factory and the input it was designed for (H, W, C)."""
  name: str
  factory: Callable[..., nn.Module]
  input_shape: tuple[int, int, int]
  num_classes: int

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


def register(name: str, *, input_shape: Sequence[int] = (224, 224, 3), num_classes: int = 1000):
  """Decorator registering a Flax module class (or a partial of one) under `name`.

  `input_shape` (H, W, C) and `num_classes` record the natural setting, used by tests,
  `cnnlab summary` and benchmarks; the model itself takes any size its layers allow.
  """
  def decorator(factory):
    cls, _ = _unwrap(factory)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
      raise TypeError(f'register({name!r}) needs a flax.linen.Module class or a partial of one, got {cls!r}')
    if name in _REGISTRY and _REGISTRY[name].factory is not factory:
      raise ValueError(f'model {name!r} is already registered (by {_REGISTRY[name].factory!r})')
    _REGISTRY[name] = ModelSpec(name, factory, tuple(input_shape), num_classes)
    return factory
  return decorator


def list_models() -> list[str]:
  """Names of all registered models, sorted."""
  return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, _REGISTRY, n=3)
    hint = f' Did you mean {", ".join(map(repr, close))}?' if close else ''
    raise ValueError(f'unknown model {name!r}.{hint} Available models: {", ".join(list_models())}')
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
      raise ValueError(f'cannot import model module {module!r} (config.model.imports): {e}') from e


# The families register themselves on import.
from cnnlab.models import simple, alexnet, vgg, resnet, inception  # noqa: E402,F401

__all__ = ['register', 'create_model', 'list_models', 'get_spec', 'import_modules', 'ModelSpec']
