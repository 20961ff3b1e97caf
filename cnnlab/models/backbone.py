"""A registered classifier used as the backbone of a dense model (fcn, localizer).

A backbone follows timm's conventions: `num_classes=0` returns the pooled pre-logits features
(B, D) with no classifier layer, and `features_only=True` the per-stage feature maps
[(B, H_i, W_i, C_i), ...], whose strides relative to the input its `feature_reductions()` method
gives. conv_stack, the ResNets and conv_encoder follow them. The backbone is built inside the dense
model as the submodule 'backbone', so a trained classifier's parameters (less its 'head') are the
backbone's: `params['backbone'] = classifier_params` for transfer learning.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

import flax.linen as nn
from flax.core import FrozenDict

from cnnlab.models.registry import _unwrap, get_spec, list_models

# The backbone arguments a dense model starts from (its `backbone_args` override them), for 64x64
# `shapes` images: conv_stack gets five conv + 2x2 max-pool stages, so its last three stages have
# strides 8, 16 and 32 (maps of 8x8, 4x4 and 2x2 on 64x64), as the FCN needs.
BACKBONE_DEFAULTS: dict[str, dict[str, Any]] = {
    'conv_stack': {'filters': (32, 64, 128, 128, 256)},
}

# The arguments the dense model itself sets on its backbone.
_SET_BY_THE_MODEL = ('num_classes', 'features_only')


def freeze_args(args: Mapping[str, Any] | None, owner: str) -> FrozenDict:
  """`args` as a hashable FrozenDict with lists made tuples (a config file's `backbone_args`)."""
  if args is None:
    return FrozenDict()
  if not isinstance(args, Mapping):
    raise ValueError(f"{owner}: backbone_args must be a dict of the backbone's arguments, "
                     f'got {args!r}')
  return FrozenDict({k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})


def backbones() -> list[str]:
  """Registered models that can serve as a backbone (they follow timm's conventions)."""
  return [name for name in list_models() if _is_backbone(name)]


def _is_backbone(name: str) -> bool:
  spec = get_spec(name)
  cls, _ = _unwrap(spec.factory)
  return ('features_only' in spec.fields and 'num_classes' in spec.fields
          and callable(getattr(cls, 'feature_reductions', None)))


def check_backbone(owner: str, name: str, args: Mapping[str, Any], needs: str) -> None:
  """ValueError unless `name` is a registered model that follows timm's backbone conventions
  (`needs` says which one the owner uses) and `args` are arguments it has."""
  spec = get_spec(name)  # an unknown name fails here, with suggestions
  if not _is_backbone(name):
    raise ValueError(f'{owner}: backbone {name!r} does not support {needs} (it has no '
                     f'features_only field or feature_reductions() method); backbones that do: '
                     f'{", ".join(backbones())}')
  fields = spec.fields
  for key in args:
    if key in _SET_BY_THE_MODEL:
      raise ValueError(f'{owner}: backbone_args must not set {key!r}; the {owner} sets it')
    if key not in fields:
      close = difflib.get_close_matches(key, fields, n=1)
      hint = f' Did you mean {close[0]!r}?' if close else ''
      raise ValueError(f'{owner}: backbone {name!r} has no argument {key!r} (backbone_args).{hint} '
                       f'Its arguments: {", ".join(sorted(fields))}')


def build_backbone(name: str, args: Mapping[str, Any], *, dtype: Any, bn_axis_name: str | None,
                   **settings) -> nn.Module:
  """The backbone module `name` (call inside the owner's compact method: it becomes the child
  'backbone'), from BACKBONE_DEFAULTS[name] overridden by `args`, with the owner's compute dtype
  and pmap batch-norm axis where the backbone takes them and `args` do not set them, and
  `settings` (num_classes=0 or features_only=True)."""
  spec = get_spec(name)
  kwargs = {**BACKBONE_DEFAULTS.get(name, {}), **args, **settings}
  for key, value in (('dtype', dtype), ('bn_axis_name', bn_axis_name)):
    if key in spec.fields and key not in args:
      kwargs[key] = value
  return spec.factory(**kwargs, name='backbone')


__all__ = ['BACKBONE_DEFAULTS', 'backbones', 'build_backbone', 'check_backbone', 'freeze_args']
