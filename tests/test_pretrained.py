"""cnnlab.pretrained: torchvision's weights give torchvision's logits in every shared architecture,
the conversion round-trips bitwise, files load safely (.safetensors without torch) and bad files
fail naming the file and the tensor; a converted run directory predicts as torchvision.

The oracle is torchvision itself (the dev extra), with random weights and randomised batch-norm
statistics, so a swapped transpose, permutation or mean/var mapping cannot pass.
"""

import argparse
import functools
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from cnnlab import pretrained
from cnnlab.pretrained import WeightsError

# (torchvision builder, input side, torchvision kwargs, cnnlab model_args). The sides keep the map
# the classifier flattens larger than 1x1 with distinct cells (AlexNet 3x3 at 128, VGG 2x2 at 64,
# GoogLeNet's auxiliary 4x4 at 64), so a wrong C,H,W -> H,W,C permutation shows. AlexNet's and
# VGG's classifiers are narrowed to 64 hidden units on both sides (torchvision's 4096 is 120M
# random numbers to draw and convert per VGG, most of this file's time; the layout and the code
# path are the same at any width, and test_layout_is_torchvisions checks the full-width names and
# shapes).
NARROW = {'hidden': 64}
CASES = [('alexnet', 128, {}, NARROW)]
CASES += [(f'vgg{d}{bn}', 64, {}, NARROW) for d in (11, 13, 16, 19) for bn in ('', '_bn')]
CASES += [(f'resnet{d}', 64, {}, {}) for d in (18, 34, 50, 101, 152)]
# GoogLeNet, with and without its auxiliary heads: test_googlenet_matches_torchvision_...


def case_id(case):
  arch, _, kwargs, _ = case
  return arch + ''.join(f'-{k}' for k, v in kwargs.items() if v)


def torch_model(arch: str, seed: int = 0, hidden: int | None = None, **kwargs):
  """torchvision's `arch` in eval mode with random weights: He-normal kernels (so the logits
  depend on every layer instead of vanishing into the last bias), and random batch-norm scale,
  bias, running mean ~ N(0, 0.1) and running var ~ U(0.5, 2). `hidden`: AlexNet's and VGG's
  hidden dense layers narrowed to this width (torchvision fixes 4096)."""
  torch = pytest.importorskip('torch')
  models = pytest.importorskip('torchvision.models')
  torch.set_num_threads(1)  # the CI machine's 2 cores are shared with XLA
  if arch == 'googlenet':
    kwargs.setdefault('init_weights', False)  # we initialise below
  with torch.device('meta'):  # no memory, no initialisation: to_empty then ours
    model = getattr(models, arch)(**kwargs)
    if hidden:
      dense = [i for i, m in enumerate(model.classifier) if isinstance(m, torch.nn.Linear)]
      for n, i in enumerate(dense):
        old = model.classifier[i]
        model.classifier[i] = torch.nn.Linear(old.in_features if n == 0 else hidden,
                                              old.out_features if n == len(dense) - 1 else hidden)
  model = model.to_empty(device='cpu')
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
        m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5, generator=g)
        if m.bias is not None:
          m.bias.normal_(0.0, 0.1, generator=g)
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.normal_(0.0, 0.1, generator=g)
        m.running_mean.normal_(0.0, 0.1, generator=g)
        m.running_var.uniform_(0.5, 2.0, generator=g)
        m.num_batches_tracked.zero_()
  return model.eval()


def torch_logits(model, x_nchw: np.ndarray):
  """The model's output on NCHW images, as numpy (GoogLeNet's training outputs: a tuple)."""
  import torch
  with torch.no_grad():
    out = model(torch.from_numpy(x_nchw))
  return out.numpy() if isinstance(out, torch.Tensor) else type(out)(*(t.numpy() for t in out))


def assert_close_logits(ours, theirs, what: str, tolerance: float = 1e-4):
  """Within `tolerance` of the largest |logit|, and the logits vary across the batch by far more
  than that (a comparison the conversion could pass by accident would not)."""
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == theirs.shape, what
  scale = np.max(np.abs(theirs))
  error = np.max(np.abs(ours - theirs))
  assert np.all(np.isfinite(theirs)) and scale > 0, what
  assert error <= tolerance * scale, (f'{what}: max |difference| {error:.3g}, max |logit| '
                                     f'{scale:.3g}')
  assert np.max(np.abs(theirs[0] - theirs[1])) > 10 * tolerance * scale, f'{what}: insensitive'


def compile_once(fn, *args):
  """fn jitted and compiled for args at XLA's lowest backend optimisation: each runs once or
  twice, and compiling is most of its time (GoogLeNet's forward pass: 4.9 s of CPU at the
  default level, 2.2 s so)."""
  options = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
  return jax.jit(fn).lower(*args).compile(compiler_options=options)


def run_once(fn, *args):
  return compile_once(fn, *args)(*args)


def assert_bitwise_equal(a: dict, b: dict):
  assert list(a) == list(b) or set(a) == set(b)
  for k in a:
    x, y = np.asarray(a[k]), np.asarray(b[k])
    assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), k


def check_logits_and_round_trip(arch: str, tmodel, x: np.ndarray, **model_args):
  """cnnlab's eval-mode logits on torchvision's converted tensors are torchvision's on NCHW `x`;
  and back to torchvision, the tensors are bitwise the same (num_batches_tracked written as 0),
  which torchvision's strict load_state_dict takes. Returns cnnlab's (model, variables) and
  the compiled apply(variables, NHWC x) with the torch logits."""
  import torch
  state = tmodel.state_dict()
  model, variables = pretrained.from_torchvision(arch, state, **model_args)
  apply = compile_once(functools.partial(model.apply, train=False), variables,
                       x.transpose(0, 2, 3, 1))
  theirs = torch_logits(tmodel.eval(), x)
  assert_close_logits(apply(variables, x.transpose(0, 2, 3, 1)), theirs, arch)

  back = pretrained.to_torchvision(arch, variables, **model_args)
  assert_bitwise_equal({k: v.numpy() for k, v in state.items()}, back)
  del back
  tmodel.load_state_dict(pretrained.to_torchvision(arch, variables, as_torch=True, **model_args),
                         strict=True)
  loaded = tmodel.state_dict()
  assert all(torch.equal(v, loaded[k]) for k, v in state.items())
  return model, variables, apply, theirs


def images(side: int, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).standard_normal((2, 3, side, side)).astype(np.float32)


def _swap_mean_var(tree):
  if 'mean' in tree:
    return {'mean': tree['var'], 'var': tree['mean']}
  return {k: _swap_mean_var(v) for k, v in tree.items()}


def _resnet_mutants(variables, tmodel):
  """Batch norm's mean and var swapped; kernels flipped in space (a wrong OIHW -> HWIO)."""
  del tmodel
  flipped = jax.tree.map(lambda w: np.asarray(w)[::-1, ::-1] if w.ndim == 4 else w,
                         variables['params'])
  swapped = _swap_mean_var(variables['batch_stats'])
  return {'mean/var swapped': {**variables, 'batch_stats': swapped},
          'kernels flipped': {**variables, 'params': flipped}}


def _alexnet_mutants(variables, tmodel):
  """The classifier reading the flattened map in torch's C,H,W order."""
  params = jax.tree.map(lambda w: w, variables['params'])  # new dicts, same arrays
  params['classifier']['fc1']['kernel'] = tmodel.state_dict()['classifier.1.weight'].numpy().T
  return {'C,H,W flatten': {**variables, 'params': params}}


# Wrong conversions the comparison must catch, checked on one architecture each.
MUTANTS = {'resnet18': _resnet_mutants, 'alexnet': _alexnet_mutants}


@pytest.mark.parametrize('case', CASES, ids=case_id)
def test_logits_match_torchvision_and_round_trip_is_exact(case):
  arch, side, kwargs, model_args = case
  tmodel = torch_model(arch, seed=len(arch) + side, hidden=model_args.get('hidden'), **kwargs)
  x = images(side)
  _, variables, apply, theirs = check_logits_and_round_trip(arch, tmodel, x, **model_args)
  # The comparison catches the mistakes it is there for (a test that cannot fail is no test).
  for what, mutant in MUTANTS.get(arch, lambda v, t: {})(variables, tmodel).items():
    with pytest.raises(AssertionError, match=r'max \|difference\|'):
      assert_close_logits(apply(mutant, x.transpose(0, 2, 3, 1)), theirs, what)


def test_googlenet_matches_torchvision_with_and_without_auxiliary_heads():
  """Both with transform_input (what torchvision's ImageNet weights use). Neither model runs its
  auxiliary heads in evaluation, so each head is also compared on its own, in eval mode, on the
  features torchvision gives it (inception4a's, 4d's), built as GoogLeNet builds it. (In training
  mode the whole model agrees too, to 1e-3 with batch statistics of 2 images, but compiling that
  costs 9 s.)"""
  torchvision = pytest.importorskip('torchvision')
  from cnnlab.layers import AuxHead, conv_block
  options = {'transform_input': True}
  tmodel = torch_model('googlenet', seed=3, aux_logits=True, **options)
  x = images(64)
  model, variables, *_ = check_logits_and_round_trip('googlenet', tmodel, x, **options)
  assert model.aux_logits

  features = {}
  for block in ('inception4a', 'inception4d'):
    getattr(tmodel, block).register_forward_hook(
        lambda module, inputs, out, block=block: features.__setitem__(block, out))
  torch_logits(tmodel, x)
  for aux, block in (('aux1', 'inception4a'), ('aux2', 'inception4d')):
    theirs = torch_logits(getattr(tmodel, aux), features[block].numpy())
    head = AuxHead(model.num_classes, conv=conv_block(norm=model.norm, bn_epsilon=model.bn_epsilon))
    ours = run_once(functools.partial(head.apply, train=False),
                    {c: variables[c][aux] for c in ('params', 'batch_stats')},
                    features[block].numpy().transpose(0, 2, 3, 1))
    assert_close_logits(ours, theirs, f'googlenet {aux}')

  # Without the heads: torchvision's googlenet(aux_logits=False) holds the other tensors.
  state = {k: v for k, v in tmodel.state_dict().items() if not k.startswith('aux')}
  plain = torchvision.models.googlenet(aux_logits=False, init_weights=False, **options)
  plain.load_state_dict(state, strict=True)
  plain_model, *_ = check_logits_and_round_trip('googlenet', plain, images(64, seed=1), **options)
  assert not plain_model.aux_logits


@pytest.mark.parametrize('arch', pretrained.TORCHVISION_ARCHS)
def test_layout_is_torchvisions(arch):
  """Full size, from shapes alone: the tensors cnnlab expects are exactly torchvision's
  state_dict's, in its order (GoogLeNet's auxiliary heads aside, which cnnlab creates earlier)."""
  torch = pytest.importorskip('torch')
  models = pytest.importorskip('torchvision.models')
  from cnnlab import models as cnnlab_models
  for kwargs in ([{'aux_logits': True}, {'aux_logits': False}] if arch == 'googlenet' else [{}]):
    with torch.device('meta'):
      state = getattr(models, arch)(**kwargs, **({'init_weights': False} if kwargs else {}))
      state = state.state_dict()
    theirs = {k: tuple(v.shape) for k, v in state.items() if not k.endswith('num_batches_tracked')}
    ours = {t.name: t.torch_shape for t in
            pretrained.layout(arch, cnnlab_models.create_model(arch, **kwargs))}
    assert ours == theirs
    if not kwargs.get('aux_logits'):
      assert list(ours) == list(theirs)


# ---- files ----

def random_state_dict(arch: str, **model_args) -> dict[str, np.ndarray]:
  """A state dict with `arch`'s names and shapes (torch not needed) and random values; every
  batch norm's num_batches_tracked 0, as torch saves it."""
  from cnnlab import models
  model = models.create_model(arch, **model_args)
  rng = np.random.RandomState(0)
  state = {}
  for t in pretrained.layout(arch, model):
    state[t.name] = rng.standard_normal(t.torch_shape).astype(np.float32)
    if t.name.endswith('.running_var'):
      state[t.name.replace('running_var', 'num_batches_tracked')] = np.zeros((), np.int64)
  return state


@pytest.fixture(scope='module')
def resnet18_file(tmp_path_factory):
  from safetensors.numpy import save_file
  state = random_state_dict('resnet18', num_classes=10)
  path = tmp_path_factory.mktemp('weights') / 'resnet18.safetensors'
  save_file(state, str(path))
  return str(path), state


def test_safetensors_loads_without_importing_torch(resnet18_file):
  path, state = resnet18_file
  model, variables = pretrained.load_weights(path, 'resnet18')
  expected = pretrained.from_torchvision('resnet18', state)[1]
  assert model.num_classes == 10
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               variables, expected)
  code = ('import sys; from cnnlab import pretrained; '
          f'model, v = pretrained.load_weights({path!r}, "resnet18"); '
          'assert v["params"]["head"]["kernel"].shape == (512, 10); '
          'assert "torch" not in sys.modules, "torch was imported"; print("ok")')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                          timeout=300)
  assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-2000:]


def test_bfloat16_safetensors_widen_exactly(tmp_path):
  """safetensors.numpy cannot read BF16 (numpy has no bfloat16): read with ml_dtypes instead."""
  torch = pytest.importorskip('torch')
  from safetensors.torch import save_file
  state = {k: torch.from_numpy(v).to(torch.bfloat16 if v.dtype == np.float32 else torch.int64)
           for k, v in random_state_dict('resnet18', num_classes=2).items()}
  path = tmp_path / 'bf16.safetensors'
  save_file(state, str(path))
  _, variables = pretrained.load_weights(str(path), 'resnet18')
  assert_bitwise_equal({k: v.float().numpy() if v.is_floating_point() else v.numpy()
                        for k, v in state.items()},
                       pretrained.to_torchvision('resnet18', variables))


def test_weights_of_another_architecture_name_the_first_missing_tensor(resnet18_file):
  path, _ = resnet18_file
  with pytest.raises(WeightsError) as e:
    pretrained.load_weights(path, 'resnet34')
  message = str(e.value)
  assert path in message and 'resnet34' in message
  assert "missing, first 'layer1.2.conv1.weight' (shape (64, 64, 3, 3))" in message


def test_misshaped_and_unexpected_tensors_are_named():
  state = random_state_dict('resnet18')
  state['layer1.0.conv1.weight'] = np.zeros((64, 64, 1, 1), np.float32)
  state['extra.weight'] = np.zeros((3,), np.float32)
  with pytest.raises(WeightsError) as e:
    pretrained.from_torchvision('resnet18', state)
  message = str(e.value)
  assert ("'layer1.0.conv1.weight': expected shape (64, 64, 3, 3), got (64, 64, 1, 1)"
          in message)
  assert "unexpected, first 'extra.weight'" in message
  with pytest.raises(ValueError, match="no torchvision weights for architecture 'resnet20'"):
    pretrained.from_torchvision('resnet20', state)


def test_containers_and_prefixes_are_unwrapped():
  state = random_state_dict('resnet18', num_classes=5)
  wrapped = {'epoch': 3, 'state_dict': {f'module.{k}': v for k, v in state.items()}}
  _, variables = pretrained.from_torchvision('resnet18', wrapped)
  back = pretrained.to_torchvision('resnet18', variables)
  assert_bitwise_equal(state, back)


def test_truncated_and_unknown_files_name_the_file(resnet18_file, tmp_path):
  path, _ = resnet18_file
  with open(path, 'rb') as f:
    data = f.read()
  truncated = tmp_path / 'cut.safetensors'
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(WeightsError,
                     match=re.escape(f'{truncated}: not a readable .safetensors file')):
    pretrained.load_weights(str(truncated), 'resnet18')
  unknown = tmp_path / 'weights.npz'
  unknown.write_bytes(b'')
  with pytest.raises(WeightsError,
                     match=re.escape(f"{unknown}: unknown weights format '.npz'")):
    pretrained.load_weights(str(unknown), 'resnet18')


def test_pth_files_load_with_weights_only_and_refuse_pickled_modules(tmp_path):
  torch = pytest.importorskip('torch')
  state = {k: torch.from_numpy(v)
           for k, v in random_state_dict('resnet18', num_classes=3).items()}
  good = tmp_path / 'resnet18.pth'
  torch.save({'model': state, 'optimizer': {}}, good)
  model, variables = pretrained.load_weights(str(good), 'resnet18')
  assert model.num_classes == 3
  assert_bitwise_equal({k: v.numpy() for k, v in state.items()},
                       pretrained.to_torchvision('resnet18', variables))
  module = tmp_path / 'module.pt'
  torch.save(torch.nn.Linear(2, 2), module)
  with pytest.raises(WeightsError,
                     match=re.escape(f'{module}: holds pickled Python objects')):
    pretrained.load_weights(str(module), 'resnet18')
  truncated = tmp_path / 'cut.pth'
  truncated.write_bytes(good.read_bytes()[:1000])
  with pytest.raises(WeightsError,
                     match=re.escape(f'{truncated}: not a readable PyTorch file')):
    pretrained.load_weights(str(truncated), 'resnet18')


# ---- a run directory ----

def test_convert_command_writes_a_run_that_predicts_as_torchvision(tmp_path):
  from safetensors.torch import save_file
  from cnnlab import pretrained_cli
  from cnnlab.inference import load_run
  tmodel = torch_model('resnet18', seed=5, num_classes=7)
  weights = tmp_path / 'resnet18.safetensors'
  save_file(tmodel.state_dict(), str(weights))
  parser = argparse.ArgumentParser(prog='cnnlab')
  pretrained_cli.add_parser(parser.add_subparsers(dest='command', required=True))
  out = tmp_path / 'run'
  args = parser.parse_args(['convert', '--arch', 'resnet18', '--weights', str(weights),
                            '--out', str(out)])
  assert args.func(args) == 0

  run = load_run(str(out))
  assert run.image_shape == (224, 224, 3) and run.num_classes == 7
  assert run.mean == pretrained.IMAGENET_MEAN and run.std == pretrained.IMAGENET_STD
  assert run.config.model.name == 'resnet18' and run.config.data.normalize == 'fixed'
  facts = json.loads((out / 'model.json').read_text())
  assert facts['num_params'] == sum(p.numel() for p in tmodel.parameters())
  pixels = np.random.RandomState(2).randint(0, 256, (2, 224, 224, 3), dtype=np.uint8)
  x = (pixels / np.float32(255) - np.float32(pretrained.IMAGENET_MEAN)) / np.float32(
      pretrained.IMAGENET_STD)
  theirs = torch_logits(tmodel, x.astype(np.float32).transpose(0, 3, 1, 2))
  # predict jitted: the same function, compiled once instead of op by op (7 s of CPU eagerly).
  assert_close_logits(jax.jit(run.predict)(pixels), theirs, 'load_run(converted resnet18)')
  with pytest.raises(ValueError, match='not an empty directory'):
    pretrained.save_converted('resnet18', run.variables, str(out))
