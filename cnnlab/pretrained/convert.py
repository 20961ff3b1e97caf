"""torchvision state dicts <-> cnnlab variables, for every zoo model torchvision also has.

The correspondence is derived, not listed: cnnlab's model is traced abstractly (`jax.eval_shape`
of `init`), every layer of its variables is named in torchvision's terms by its family's rule
below, and each tensor is converted by what the layer is:

  convolution   weight (O, I, kh, kw)        <-> conv/kernel (kh, kw, I, O); bias <-> conv/bias
  dense         weight (out, in)             <-> kernel (in, out); bias <-> bias
  dense after a flatten of an NCHW map (AlexNet/VGG classifier, GoogLeNet's auxiliary fc1):
                weight (out, C*H*W)          <-> kernel (H*W*C, out): cnnlab flattens NHWC
  batch norm    weight, bias                 <-> params norm/scale, norm/bias
                running_mean, running_var    <-> batch_stats norm/mean, norm/var
                num_batches_tracked          ignored on the way in, written back as 0 (PyTorch
                                                 reads it only with momentum=None)

so the tensors torchvision must hold are exactly those the cnnlab model has, and a missing,
unexpected or mis-shaped one is an error naming it. Arrays come back as float32 (cnnlab's
parameter dtype; float16/bfloat16 widen exactly), and a round trip is bitwise exact.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnlab import models
from cnnlab.models import alexnet, inception, resnet, vgg

# cnnlab's registered name = torchvision's builder name, for every architecture both have.
TORCHVISION_ARCHS = ('alexnet', 'vgg11', 'vgg11_bn', 'vgg13', 'vgg13_bn', 'vgg16', 'vgg16_bn',
                     'vgg19', 'vgg19_bn', 'resnet18', 'resnet34', 'resnet50', 'resnet101',
                     'resnet152', 'googlenet')


class WeightsError(ValueError):
  """Tensors that do not fit the architecture, or a file that holds none; the message names the
  file (or 'state_dict') and the first missing, unexpected or mis-shaped tensor."""


# ---- torchvision's names of cnnlab's layers, per family ----
# A rule maps the path of a cnnlab layer holding variables ('stage1_block1/conv1/conv',
# 'classifier/fc1') to (torchvision module name, C) where C > 0 marks a dense layer reading a
# flattened NCHW map of C channels; None when torchvision has no such layer.

Rule = Callable[[nn.Module, str], 'tuple[str, int] | None']


def _resnet_rule(model: nn.Module, layer: str):
  del model
  fixed = {'stem_conv/conv': 'conv1', 'stem_conv/norm': 'bn1', 'head': 'fc'}
  if layer in fixed:
    return fixed[layer], 0
  m = re.fullmatch(r'stage(\d+)_block(\d+)/(?:conv(\d)|(shortcut))/(conv|norm)', layer)
  if m is None:
    return None
  block = f'layer{m[1]}.{int(m[2]) - 1}'
  if m[4]:  # torchvision's downsample = Sequential(conv1x1, BatchNorm2d)
    return f'{block}.downsample.{0 if m[5] == "conv" else 1}', 0
  return f'{block}.{"conv" if m[5] == "conv" else "bn"}{m[3]}', 0


def _features_indices(convs: list[tuple[str, bool]], batch_norm: bool) -> dict[str, int]:
  """Index in torchvision's `features` Sequential of each convolution (its BatchNorm2d follows it),
  from the convolutions in order with whether a max-pool follows each: Conv, [BN,] ReLU, [Pool]."""
  out, index = {}, 0
  for name, pool in convs:
    out[name] = index
    index += (3 if batch_norm else 2) + (1 if pool else 0)
  return out


def _vgg_rule(model: nn.Module, layer: str):
  convs = [(f'stage{i}_conv{j}', j == depth) for i, depth in enumerate(model.stage_sizes, start=1)
           for j in range(1, depth + 1)]
  return _sequential_rule(layer, convs, {'fc1': 0, 'fc2': 3, 'fc_out': 6},
                          channels=model.widths[len(model.stage_sizes) - 1],
                          batch_norm=model.norm == 'batch')


def _alexnet_rule(model: nn.Module, layer: str):
  convs = [(f'conv{i}', pool) for i, (*_, pool) in enumerate(alexnet._FEATURES, start=1)]
  # classifier = Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear
  return _sequential_rule(layer, convs, {'fc1': 1, 'fc2': 4, 'fc_out': 6},
                          channels=alexnet._FEATURES[-1][0], batch_norm=False)


def _sequential_rule(layer: str, convs, classifier: dict[str, int], channels: int,
                     batch_norm: bool):
  """AlexNet and VGG: `features.N` convolutions (each followed by a BatchNorm2d when
  `batch_norm`: VGG's _bn variants), `classifier.N` dense layers."""
  m = re.fullmatch(r'(\w+)/(conv|norm)', layer)
  indices = _features_indices(convs, batch_norm)
  if m and m[1] in indices and (m[2] == 'conv' or batch_norm):
    return f'features.{indices[m[1]] + (m[2] == "norm")}', 0
  m = re.fullmatch(r'classifier/(\w+)', layer)
  if m and m[1] in classifier:
    return f'classifier.{classifier[m[1]]}', channels if m[1] == 'fc1' else 0
  return None


# cnnlab's Inception branches -> torchvision's (branch2 = Sequential(1x1, 3x3), ...).
_INCEPTION_BRANCHES = {'branch1': 'branch1', 'branch2_reduce': 'branch2.0', 'branch2': 'branch2.1',
                       'branch3_reduce': 'branch3.0', 'branch3': 'branch3.1',
                       'branch4_proj': 'branch4.1'}


def _googlenet_rule(model: nn.Module, layer: str):
  del model
  if layer == 'head':
    return 'fc', 0
  m = re.fullmatch(r'(conv\d|inception\w+/\w+|aux\d/conv)/(conv|norm)', layer)
  if m:  # torchvision's BasicConv2d: .conv and .bn
    parts = m[1].split('/')
    if parts[0].startswith('inception'):
      if parts[1] not in _INCEPTION_BRANCHES:
        return None
      parts[1] = _INCEPTION_BRANCHES[parts[1]]
    return f'{".".join(parts)}.{"conv" if m[2] == "conv" else "bn"}', 0
  m = re.fullmatch(r'(aux\d)/(fc\d)', layer)
  if m:  # InceptionAux: 4x4 pool, 1x1 conv to 128 channels, flatten, fc1, fc2
    return f'{m[1]}.{m[2]}', (128 if m[2] == 'fc1' else 0)
  return None


@dataclasses.dataclass(frozen=True)
class _Family:
  rule: Rule
  head: str  # cnnlab's classifier layer (its kernel gives num_classes)
  torch_head: str  # torchvision's


_FAMILIES = {
    resnet.ResNet: _Family(_resnet_rule, 'head', 'fc'),
    inception.GoogLeNet: _Family(_googlenet_rule, 'head', 'fc'),
    vgg.VGG: _Family(_vgg_rule, 'classifier/fc_out', 'classifier.6'),
    alexnet.AlexNet: _Family(_alexnet_rule, 'classifier/fc_out', 'classifier.6'),
}


# ---- tensors ----

@dataclasses.dataclass(frozen=True)
class Tensor:
  """One tensor of the correspondence: torchvision's `name` <-> cnnlab's `collection`/`path`."""
  name: str
  collection: str  # 'params' | 'batch_stats'
  path: tuple[str, ...]  # inside the collection
  kind: str  # 'conv' | 'dense' | 'vector'
  shape: tuple[int, ...]  # cnnlab's
  channels: int = 0  # dense: channels C of the NCHW map it reads flattened (0: not flattened)

  @property
  def torch_shape(self) -> tuple[int, ...]:
    if self.kind == 'conv':
      kh, kw, i, o = self.shape
      return (o, i, kh, kw)
    if self.kind == 'dense':
      return self.shape[::-1]
    return self.shape

  def to_cnnlab(self, w: np.ndarray) -> np.ndarray:
    if self.kind == 'conv':
      return w.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
    if self.kind == 'dense' and self.channels:
      out, flat = w.shape  # flat = C*H*W in torch's order; cnnlab reads H*W*C
      c = self.channels
      return w.reshape(out, c, flat // c).transpose(2, 1, 0).reshape(flat, out)
    return w.T if self.kind == 'dense' else w

  def to_torch(self, w: np.ndarray) -> np.ndarray:
    if self.kind == 'conv':
      return w.transpose(3, 2, 0, 1)  # (kh, kw, I, O) -> (O, I, kh, kw)
    if self.kind == 'dense' and self.channels:
      flat, out = w.shape
      c = self.channels
      return w.reshape(flat // c, c, out).transpose(2, 1, 0).reshape(out, flat)
    return w.T if self.kind == 'dense' else w


# PyTorch's BatchNorm2d tensors, in its state_dict order, and cnnlab's names for them.
_BATCH_NORM = (('weight', 'params', 'scale'), ('bias', 'params', 'bias'),
               ('running_mean', 'batch_stats', 'mean'), ('running_var', 'batch_stats', 'var'))
NUM_BATCHES_TRACKED = 'num_batches_tracked'


def _layers(tree: Mapping, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict]]:
  """(path, {leaf name: leaf}) of each module holding leaves, in creation order."""
  leaves = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
  if leaves:
    yield prefix, leaves
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _layers(v, prefix + (k,))


def _abstract_variables(model: nn.Module, input_shape: tuple[int, int, int]) -> dict:
  """The model's variables as nested dicts of jax.ShapeDtypeStruct, in the order its layers were
  created (jax.eval_shape's own result has its dicts' keys sorted: 'stage10' before 'stage2').
  Tracing a deep model takes seconds, so equal models share one trace."""
  try:
    return _cached_abstract_variables(model, input_shape)
  except TypeError:  # an unhashable argument (a list): trace without the cache
    return _trace_variables(model, input_shape)


@functools.lru_cache(maxsize=32)
def _cached_abstract_variables(model: nn.Module, input_shape: tuple[int, int, int]) -> dict:
  return _trace_variables(model, input_shape)


def _trace_variables(model: nn.Module, input_shape: tuple[int, int, int]) -> dict:
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  created: list[dict] = []

  def shapes(tree):
    if isinstance(tree, Mapping):
      return {k: shapes(v) for k, v in tree.items()}
    return jax.ShapeDtypeStruct(tree.shape, tree.dtype)

  def init(x):
    variables = model.init(rngs, x, train=False)
    created.append(shapes(variables))
    return variables
  jax.eval_shape(init, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  return created[0]


def _family(model: nn.Module) -> _Family:
  for cls, family in _FAMILIES.items():
    if isinstance(model, cls):
      return family
  raise ValueError(f'no torchvision layout for {type(model).__name__}')


def layout(arch: str, model: nn.Module) -> list[Tensor]:
  """Every tensor of `model` (the registered `arch`) with its torchvision name, in order; a layer
  torchvision does not have (a model option outside torchvision's layout) is a WeightsError."""
  rule = _family(model).rule
  variables = _abstract_variables(model, models.get_spec(arch).input_shape)
  stats = dict(_layers(variables.get('batch_stats', {})))
  out = []
  for path, leaves in _layers(variables['params']):
    layer = '/'.join(path)
    named = rule(model, layer)
    if named is None:
      raise WeightsError(f'{arch} with these options has a layer {layer!r} that torchvision\'s '
                         f'{arch} does not have; use the options of torchvision\'s layout')
    prefix, channels = named
    if 'scale' in leaves:  # a normalisation: torchvision's are all batch norms
      if path not in stats:
        raise WeightsError(f'{arch} with these options normalises {layer!r} by another norm '
                           f'than batch norm, which torchvision\'s {arch} uses; use norm=\'batch\'')
      both = {'params': leaves, 'batch_stats': stats[path]}
      out += [Tensor(f'{prefix}.{torch_name}', collection, path + (leaf,), 'vector',
                     tuple(both[collection][leaf].shape))
              for torch_name, collection, leaf in _BATCH_NORM]
      continue
    kernel = leaves['kernel']
    kind = 'conv' if kernel.ndim == 4 else 'dense'
    out.append(Tensor(f'{prefix}.weight', 'params', path + ('kernel',), kind, tuple(kernel.shape),
                      channels))
    if 'bias' in leaves:
      out.append(Tensor(f'{prefix}.bias', 'params', path + ('bias',), 'vector',
                        tuple(leaves['bias'].shape)))
  return out


# ---- arrays ----

def _to_numpy(value: Any, name: str, source: str) -> np.ndarray:
  """A torch tensor, numpy or JAX array -> numpy float32 (float16/bfloat16 widen exactly)."""
  if type(value).__module__.startswith('torch'):
    value = value.detach().cpu()
    if not value.is_floating_point():
      raise WeightsError(f'{source}: tensor {name!r} has dtype {value.dtype}, expected floats')
    value = value.float().numpy()  # numpy has no bfloat16: widen in torch
  array = np.asarray(value)
  if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != 'bfloat16':
    raise WeightsError(f'{source}: tensor {name!r} has dtype {array.dtype}, expected floats')
  return array.astype(np.float32, copy=False)


def unwrap(state_dict: Mapping[str, Any], source: str = 'state_dict') -> dict[str, Any]:
  """The tensors of a state dict, out of the containers training scripts save it in:
  {'state_dict': ...} or {'model': ...} (a checkpoint with optimizer state beside it), and the
  'module.' (DataParallel/DDP) or '_orig_mod.' (torch.compile) prefix on every name."""
  if not isinstance(state_dict, Mapping):
    raise WeightsError(f'{source} holds a {type(state_dict).__name__}, not a state dict (a '
                       'mapping from tensor names to tensors)')
  for key in ('state_dict', 'model', 'model_state_dict'):
    inner = state_dict.get(key)
    if isinstance(inner, Mapping) and not any(hasattr(v, 'shape') for v in state_dict.values()):
      return unwrap(inner, source)
  out = dict(state_dict)
  for prefix in ('module.', '_orig_mod.'):
    if out and all(isinstance(k, str) and k.startswith(prefix) for k in out):
      out = {k[len(prefix):]: v for k, v in out.items()}
  return out


def _infer_args(arch: str, names: Mapping[str, tuple[int, ...]], model_args: dict) -> dict:
  """num_classes from the classifier's shape, and GoogLeNet's aux_logits from the presence of its
  auxiliary heads, unless given."""
  model_args = dict(model_args)
  head_weight = f'{_family(models.create_model(arch)).torch_head}.weight'
  if 'num_classes' not in model_args and head_weight in names and len(names[head_weight]) == 2:
    model_args['num_classes'] = int(names[head_weight][0])
  if arch == 'googlenet' and 'aux_logits' not in model_args:
    model_args['aux_logits'] = any(n.startswith(('aux1.', 'aux2.')) for n in names)
  return model_args


def _check_arch(arch: str) -> None:
  if arch not in TORCHVISION_ARCHS:
    raise ValueError(f'no torchvision weights for architecture {arch!r}; torchvision and cnnlab '
                     f'share: {", ".join(TORCHVISION_ARCHS)}')


def _problems(what: str, arch: str, missing, unexpected, misshaped) -> str | None:
  """One message naming the first tensor of each kind of problem, with counts."""
  parts = []
  if missing:
    parts.append(f'{len(missing)} tensor(s) missing, first {missing[0]}')
  if misshaped:
    parts.append(f'{len(misshaped)} mis-shaped, first {misshaped[0]}')
  if unexpected:
    parts.append(f'{len(unexpected)} unexpected, first {unexpected[0]}')
  return f'{what} does not hold torchvision {arch} weights: {"; ".join(parts)}' if parts else None


def from_torchvision(arch: str, state_dict: Mapping[str, Any], *, source: str = 'state_dict',
                     **model_args) -> tuple[nn.Module, dict]:
  """(model, variables) of cnnlab's `arch` holding torchvision's `state_dict`.

  state_dict: tensor name -> torch tensor or numpy array, as `torchvision.models.<arch>()
    .state_dict()` (containers and 'module.' prefixes are unwrapped).
  model_args: the model's arguments (dropout, ...). num_classes is read from the classifier, and
    GoogLeNet's aux_logits from whether the auxiliary heads are there. torchvision's ImageNet
    GoogLeNet weights need `transform_input=True` (torchvision sets it when it loads them; the
    state dict does not record it).
  source: what to call the tensors' origin in errors (load_weights passes the file).
  Returns `variables = {'params': ..., 'batch_stats': ...}` of float32 arrays, for
  `model.apply(variables, images, train=False)` on NHWC images normalised as torchvision's.
  Raises WeightsError naming the first missing, unexpected or mis-shaped tensor.
  """
  _check_arch(arch)
  tensors = unwrap(state_dict, source)
  shapes = {k: tuple(getattr(v, 'shape', ())) for k, v in tensors.items()}
  model = models.create_model(arch, **_infer_args(arch, shapes, model_args))
  entries = layout(arch, model)
  missing, misshaped = [], []
  for t in entries:
    if t.name not in tensors:
      missing.append(f'{t.name!r} (shape {t.torch_shape})')
    elif shapes[t.name] != t.torch_shape:
      misshaped.append(f'{t.name!r}: expected shape {t.torch_shape}, got {shapes[t.name]}')
  known = {t.name for t in entries}
  known |= {f'{t.name.rsplit(".", 1)[0]}.{NUM_BATCHES_TRACKED}' for t in entries
            if t.name.endswith('.running_var')}
  unexpected = [f'{k!r} (shape {shapes[k]})' for k in tensors if k not in known]
  message = _problems(source, arch, missing, unexpected, misshaped)
  if message:
    raise WeightsError(message)
  variables: dict[str, Any] = {}
  for t in entries:
    node = variables.setdefault(t.collection, {})
    for key in t.path[:-1]:
      node = node.setdefault(key, {})
    node[t.path[-1]] = jnp.asarray(t.to_cnnlab(_to_numpy(tensors[t.name], t.name, source)))
  return model, variables


def _leaf_paths(tree: Mapping, prefix=()) -> Iterator[tuple[str, ...]]:
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _leaf_paths(v, prefix + (k,))
    else:
      yield prefix + (k,)


def model_for(arch: str, variables: Mapping[str, Any],
              **model_args) -> tuple[nn.Module, list[Tensor]]:
  """cnnlab's `arch` shaped as `variables` (num_classes from the classifier, GoogLeNet's
  aux_logits from its auxiliary heads), and its layout; WeightsError when they do not fit."""
  _check_arch(arch)
  params = variables.get('params', {})
  model_args = dict(model_args)
  node = params
  for key in _family(models.create_model(arch)).head.split('/') + ['kernel']:
    node = node.get(key, {}) if isinstance(node, Mapping) else {}
  if 'num_classes' not in model_args and getattr(node, 'ndim', 0) == 2:
    model_args['num_classes'] = int(node.shape[1])
  if arch == 'googlenet' and 'aux_logits' not in model_args:
    model_args['aux_logits'] = 'aux1' in params or 'aux2' in params
  model = models.create_model(arch, **model_args)
  entries = layout(arch, model)
  missing, misshaped = [], []
  for t in entries:
    node = variables.get(t.collection, {})
    for key in t.path:
      node = node.get(key) if isinstance(node, Mapping) else None
    where = '/'.join((t.collection,) + t.path)
    if node is None:
      missing.append(f'{where!r} (shape {t.shape})')
    elif tuple(np.shape(node)) != t.shape:
      misshaped.append(f'{where!r}: expected shape {t.shape}, got {tuple(np.shape(node))}')
  known = {(t.collection,) + t.path for t in entries}
  unexpected = ['/'.join(p) for c in ('params', 'batch_stats')
                for p in _leaf_paths(variables.get(c, {}), (c,)) if p not in known]
  unexpected += [c for c in variables if c not in ('params', 'batch_stats')]
  message = _problems('variables', arch, missing, [repr(u) for u in unexpected], misshaped)
  if message:
    raise WeightsError(message)
  return model, entries


def to_torchvision(arch: str, variables: Mapping[str, Any], *, as_torch: bool = False,
                   **model_args) -> dict[str, Any]:
  """torchvision's state dict of cnnlab's `arch` holding `variables` ({'params', 'batch_stats'}):
  name -> numpy array (contiguous, float32), or torch tensor with `as_torch=True`, in the order of
  cnnlab's layers; `torchvision.models.<arch>(num_classes=...).load_state_dict(...)` takes it.
  Each batch norm's num_batches_tracked is written as 0 (int64). Raises WeightsError naming the
  first missing, unexpected or mis-shaped variable."""
  _, entries = model_for(arch, variables, **model_args)
  out: dict[str, Any] = {}
  for t in entries:
    node = variables[t.collection]
    for key in t.path:
      node = node[key]
    out[t.name] = np.array(t.to_torch(np.asarray(node)), dtype=np.float32, order='C')
    if t.name.endswith('.running_var'):
      out[f'{t.name.rsplit(".", 1)[0]}.{NUM_BATCHES_TRACKED}'] = np.zeros((), np.int64)
  if as_torch:
    import torch
    out = {k: torch.from_numpy(v) for k, v in out.items()}
  return out
