"""Weight files: `.safetensors` (read without torch) and PyTorch's `.pth`/`.pt` (read by torch with
`weights_only=True`, so loading never runs code from the file)."""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import flax.linen as nn
import numpy as np

from cnnlab.pretrained.convert import WeightsError, from_torchvision

SAFETENSORS = ('.safetensors',)
TORCH = ('.pth', '.pt')


def read_state_dict(path: str) -> dict[str, Any]:
  """The tensors in `path`: name -> numpy array (.safetensors) or torch tensor (.pth/.pt).

  A `.safetensors` file is read by `safetensors.numpy`, which does not import torch. A `.pth` or
  `.pt` file needs torch and is read with `torch.load(weights_only=True)`: only tensors and plain
  containers unpickle, and a file holding a whole pickled module (`torch.save(model)`) is refused
  rather than executed. WeightsError names the file for an unknown extension, a truncated or
  corrupt file, or one holding no state dict.
  """
  path = os.fspath(path)
  extension = os.path.splitext(path)[1].lower()
  if extension not in SAFETENSORS + TORCH:
    raise WeightsError(f'{path}: unknown weights format {extension or "(no extension)"!r}; '
                       f'expected {", ".join(SAFETENSORS + TORCH)}')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'weights file {path!r} does not exist')
  if extension in SAFETENSORS:
    return _read_safetensors(path)
  return _read_torch(path)


def _read_safetensors(path: str) -> dict[str, Any]:
  from safetensors.numpy import load_file
  try:
    try:
      return load_file(path)
    except TypeError:  # numpy has no bfloat16, so safetensors.numpy cannot read BF16 tensors
      return _read_safetensors_bytes(path)
  except WeightsError:
    raise
  except Exception as e:  # noqa: BLE001 - safetensors' own error types differ by version
    raise WeightsError(f'{path}: not a readable .safetensors file (truncated or corrupt?): '
                       f'{type(e).__name__}: {e}') from None


def _read_safetensors_bytes(path: str) -> dict[str, Any]:
  """A .safetensors file with BF16 tensors, read as ml_dtypes' bfloat16 (JAX's own)."""
  import ml_dtypes
  from safetensors import deserialize
  dtypes = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
            'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
            'BOOL': np.bool_}
  with open(path, 'rb') as f:
    tensors = deserialize(f.read())
  out = {}
  for name, view in tensors:
    if view['dtype'] not in dtypes:
      raise WeightsError(f'{path}: tensor {name!r} has dtype {view["dtype"]}, which cnnlab does '
                         'not read')
    out[name] = np.frombuffer(view['data'], dtypes[view['dtype']]).reshape(view['shape'])
  return out


def _read_torch(path: str) -> dict[str, Any]:
  try:
    import torch
  except ImportError:
    raise WeightsError(f'{path}: reading a PyTorch file needs torch (`pip install torch`); or '
                       'convert it to .safetensors, which cnnlab reads without torch') from None
  try:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    # weights_only refuses any class but tensors and containers: a pickled nn.Module ends here.
    found = re.search(r'GLOBAL ([\w.]+)', str(e))
    what = f' (it holds a {found[1]})' if found else ''
    raise WeightsError(
        f'{path}: holds pickled Python objects, not only tensors{what}: a whole model saved with '
        'torch.save(model)? cnnlab does not unpickle objects, because unpickling can run code. '
        'Save model.state_dict() instead.') from None
  except Exception as e:  # noqa: BLE001 - truncated zip, wrong magic number, ...
    raise WeightsError(f'{path}: not a readable PyTorch file (truncated or corrupt?): '
                       f'{type(e).__name__}: {e}') from None
  if not isinstance(loaded, dict):
    raise WeightsError(f'{path}: holds a {type(loaded).__name__}, not a state dict (a mapping '
                       'from tensor names to tensors)')
  return loaded


def load_weights(path: str, arch: str, **model_args) -> tuple[nn.Module, dict]:
  """(model, variables) of cnnlab's `arch` holding torchvision's weights from the file `path`
  (`.safetensors`, `.pth`, `.pt`); `model_args` as for `from_torchvision` (e.g.
  transform_input=True for torchvision's ImageNet GoogLeNet). Raises WeightsError naming the
  file and the first missing, unexpected or mis-shaped tensor."""
  return from_torchvision(arch, read_state_dict(path), source=os.fspath(path), **model_args)
