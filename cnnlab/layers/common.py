"""What every layer shares: argument checks, shape checks, activations, the choices, the initialiser.

Every spatial layer resolves its padding with `cnnlab.geometry` from the static input shape and
checks that its output is at least one cell wide (`check_output`), so an input too small for an
architecture fails with the name of the layer instead of an XLA shape error. Invalid arguments
fail at construction.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab import geometry

ModuleDef = Any
IntOrPair = Union[int, Sequence[int]]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array] | None] = {
    'relu': nn.relu,
    'relu6': nn.relu6,
    'gelu': nn.gelu,
    'silu': nn.silu,
    'swish': nn.silu,
    'elu': nn.elu,
    'leaky_relu': nn.leaky_relu,
    'tanh': jnp.tanh,
    'sigmoid': nn.sigmoid,
    'none': None,
}
NORMS = ('batch', 'group', 'layer', 'none')
POOLS = ('max', 'avg', 'none')

# He (Kaiming) normal over fan-out, as torchvision initialises ResNet/VGG convolutions.
he_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def pair(value: IntOrPair, name: str) -> tuple[int, int]:
  """(h, w) from an int or a 2-sequence of positive ints; ValueError naming `name` otherwise."""
  values = (value, value) if isinstance(value, int) else tuple(value)
  if len(values) != 2:
    raise ValueError(f'{name} must be an int or a pair of ints, got {value!r}')
  for v in values:
    geometry.check_positive(name, v)
  return values  # type: ignore[return-value]


def activation(name: str | Callable) -> Callable[[jax.Array], jax.Array] | None:
  """The activation function called `name` (None for 'none'); callables pass through."""
  if callable(name):
    return name
  if name not in ACTIVATIONS:
    raise ValueError(f'act must be one of {sorted(ACTIVATIONS)} or a callable, got {name!r}')
  return ACTIVATIONS[name]


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
  if value not in choices:
    raise ValueError(f'{name} must be one of {tuple(choices)}, got {value!r}')
  return value


def layer_name(module: nn.Module) -> str:
  """'stage2_block1/conv2': the module's path, for error messages."""
  return '/'.join(module.path) or type(module).__name__


def spatial_input(module: nn.Module, x: jax.Array) -> None:
  if x.ndim != 4:
    raise ValueError(f'{layer_name(module)}: expected NHWC input of rank 4, got shape {x.shape}')


def check_output(module: nn.Module, x: jax.Array, out: Sequence[int], what: str) -> None:
  if min(out) < 1:
    raise ValueError(
        f'{layer_name(module)}: input of spatial size {tuple(x.shape[1:3])} is too small for '
        f'{what} (output would be {tuple(out)}); use a larger input or less downsampling')
