"""The arithmetic of convolution and pooling windows, in plain Python.

One spatial dimension at a time. These functions are the single source of truth for output sizes:
the layers in `cnnlab.layers` resolve their padding with `resolve_padding` and check their output
with `conv_output_size` / `pool_output_size`, and `cnnlab.analysis` uses the same functions, so the
analysis can never disagree with what the layers compute.

Padding, wherever it is accepted, is one of
  'VALID'            no padding;
  'SAME'             TensorFlow/XLA rule: output = ceil(n / stride), the extra cell (if odd) goes last;
  'FULL'             every partial overlap: dilation * (kernel - 1) on both sides;
  p (int >= 0)       p cells on both sides (PyTorch's `padding=p`);
  (lo, hi)           explicit cells before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

PaddingLike = Union[str, int, tuple[int, int], Sequence[Union[int, tuple[int, int]]]]

PADDING_MODES = ('VALID', 'SAME', 'FULL')


def check_positive(name: str, value: int) -> int:
  """Returns `value` if it is an int >= 1, else raises ValueError naming the argument."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{name} must be a positive integer, got {value!r}')
  return value


def check_padding(padding: PaddingLike, ndim: int = 2, name: str = 'padding') -> None:
  """Validates a padding spec for `ndim` spatial dims without resolving it; raises ValueError.

  A sequence has one entry per spatial dim, each an int (both sides) or a (lo, hi) pair, so
  `(1, 2)` pads height by 1 and width by 2 as PyTorch's `padding=(1, 2)` does.
  """
  if isinstance(padding, str):
    if padding.upper() not in PADDING_MODES:
      raise ValueError(f'{name} must be one of {PADDING_MODES}, an int or (lo, hi) pairs; got {padding!r}')
    return
  if isinstance(padding, bool) or not isinstance(padding, (int, Sequence)):
    raise ValueError(f'{name} must be a string, an int or (lo, hi) pairs; got {padding!r}')
  if isinstance(padding, int):
    if padding < 0:
      raise ValueError(f'{name} must be >= 0, got {padding}')
    return
  if len(padding) != ndim:
    raise ValueError(f'{name} needs one entry per spatial dim ({ndim}), got {padding!r}')
  for item in padding:
    pair = (item, item) if isinstance(item, int) else tuple(item)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in pair):
      raise ValueError(f'{name} entries must be ints >= 0 or (lo, hi) pairs of them; got {padding!r}')


def padding_for_dim(padding: PaddingLike, dim: int):
  """The padding spec of spatial dimension `dim`: a mode string, an int or a (lo, hi) pair."""
  if isinstance(padding, (str, int)):
    return padding
  return padding[dim]


def resolve_padding(padding, kernel: int, stride: int = 1, dilation: int = 1,
                    size: int | None = None) -> tuple[int, int]:
  """(lo, hi) cells of padding for one spatial dim. `size` is needed only for 'SAME'."""
  extent = dilation * (kernel - 1) + 1  # cells the dilated kernel spans
  if isinstance(padding, str):
    mode = padding.upper()
    if mode == 'VALID':
      return (0, 0)
    if mode == 'FULL':
      return (extent - 1, extent - 1)
    if mode == 'SAME':
      if size is None:
        raise ValueError("'SAME' padding needs the input size")
      out = -(-size // stride)
      total = max((out - 1) * stride + extent - size, 0)
      return (total // 2, total - total // 2)
    raise ValueError(f'padding must be one of {PADDING_MODES}, an int or (lo, hi); got {padding!r}')
  if isinstance(padding, int):
    return (padding, padding)
  lo, hi = padding
  return (int(lo), int(hi))


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: PaddingLike = 0,
                     dilation: int = 1) -> int:
  """floor((n + lo + hi - d(k-1) - 1) / s) + 1: the output length of a convolution.

  With symmetric integer padding p this is the textbook floor((n + 2p - d(k-1) - 1)/s) + 1.
  A result < 1 means the kernel does not fit the (padded) input.
  """
  lo, hi = resolve_padding(padding, kernel, stride, dilation, size)
  return (size + lo + hi - dilation * (kernel - 1) - 1) // stride + 1


def ceil_mode_extra(size: int, window: int, stride: int, lo: int, hi: int) -> int:
  """Extra cells past `hi` that PyTorch's ceil_mode needs for its last (partial) window."""
  span = size + lo + hi - window
  out = -(-span // stride) + 1
  # PyTorch drops the last window if it would start in the right padding.
  if (out - 1) * stride >= size + lo:
    out -= 1
  return max((out - 1) * stride + window - (size + lo + hi), 0)


def pool_output_size(size: int, window: int, stride: int | None = None, padding: PaddingLike = 0,
                     ceil_mode: bool = False) -> int:
  """Output length of a pooling window (PyTorch semantics, including `ceil_mode`)."""
  stride = window if stride is None else stride
  lo, hi = resolve_padding(padding, window, stride, 1, size)
  if ceil_mode:
    hi += ceil_mode_extra(size, window, stride, lo, hi)
  return (size + lo + hi - window) // stride + 1


def conv_transpose_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0,
                               dilation: int = 1, output_padding: int = 0) -> int:
  """(n - 1)s - 2p + d(k - 1) + output_padding + 1: PyTorch's ConvTranspose output length."""
  return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


@dataclass(frozen=True)
class Field:
  """Receptive field of one feature map along one spatial dim, in input pixels.

  size:  how many input pixels one output cell sees;
  jump:  distance in input pixels between two neighbouring output cells (product of strides);
  start: centre of the first output cell's field, in input coordinates (pixel centres at 0, 1, …;
         negative values mean the field starts in the padding).
  """
  size: float = 1
  jump: float = 1
  start: float = 0.0

  def then(self, kernel: int, stride: int = 1, pad_lo: int = 0, dilation: int = 1) -> 'Field':
    """The field after a window of `kernel` cells (dilated), `stride`, and `pad_lo` leading pad."""
    extent = dilation * (kernel - 1) + 1
    return Field(size=self.size + (extent - 1) * self.jump,
                 jump=self.jump * stride,
                 start=self.start + ((extent - 1) / 2 - pad_lo) * self.jump)

  @staticmethod
  def union(fields: Sequence['Field']) -> 'Field':
    """Field of a sum/concat of maps with the same grid (e.g. Inception branches, residual add)."""
    jumps = {f.jump for f in fields}
    if len(jumps) != 1:
      raise ValueError(f'cannot merge feature maps with different strides {sorted(jumps)}')
    lo = min(f.start - (f.size - 1) / 2 for f in fields)
    hi = max(f.start + (f.size - 1) / 2 for f in fields)
    return Field(size=hi - lo + 1, jump=jumps.pop(), start=(lo + hi) / 2)


def textbook_receptive_field(num_layers: int, kernel: int) -> int:
  """L(K - 1) + 1: receptive field of L stacked stride-1 convolutions of size K."""
  return num_layers * (kernel - 1) + 1


__all__ = [
    'PADDING_MODES', 'check_positive', 'check_padding', 'padding_for_dim', 'resolve_padding',
    'conv_output_size', 'pool_output_size', 'conv_transpose_output_size', 'ceil_mode_extra',
    'Field', 'textbook_receptive_field',
]
