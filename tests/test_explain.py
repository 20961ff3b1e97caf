"""cnnlab.explain against Captum (the oracle: twin PyTorch models holding the same weights), the
ReLU substitution's reach and its absence from training, layers, feature maps, receptive fields,
top activations, bad input, and `cnnlab explain` end to end.

The twins run in float32: XLA:CPU compiles a float64 network's gradient ten times slower, and
float32 agrees with Captum to 1e-4 of the largest attribution. Inputs and baselines are random,
never constant, so that no max-pool window holds tied values that rounding could order
differently in the two frameworks (tied zeros after a ReLU are exact, and both send the gradient
to the first)."""

import argparse
import functools
import os
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab import explain, layers
from cnnlab import explain_cli
from cnnlab.explain import features, figures, probe
from cnnlab.layers import common

torch = pytest.importorskip('torch')
captum_attr = pytest.importorskip('captum.attr')
tnn = torch.nn
PNG = b'\x89PNG\r\n\x1a\n'


# ---- twin models: cnnlab.layers (NHWC) and PyTorch (NCHW), the same names, the same weights ----

class ResidualNet(nn.Module):
  """conv-BN-ReLU, max-pool, an identity and a projection residual block, global pool, MLP head
  (dense-ReLU-dense)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = layers.ConvBlock(6, 3, padding=1, name='conv1')(x, train)
    x = layers.Pool('max', 2, name='pool1')(x)
    x = layers.BasicBlock(6, name='block1')(x, train)
    self.sow('intermediates', 'stage1', x)
    x = layers.BasicBlock(8, strides=2, name='block2')(x, train)
    x = layers.GlobalPool('avg', name='global_pool')(x)
    return layers.MLPHead(5, hidden=(12,), dropout=0.0, name='head')(x, train)


class BranchNet(nn.Module):
  """conv-BN-ReLU, an Inception block (its max-pool branch included), GoogLeNet's auxiliary head
  (adaptive pool, 1x1 conv-BN-ReLU, dense-ReLU-dense)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = layers.ConvBlock(6, 3, padding=1, name='stem')(x, train)
    x = layers.InceptionBlock(4, 3, 5, 2, 3, 3, branch3_kernel=3, name='inception')(x, train)
    return layers.AuxHead(5, pool_size=2, proj_features=6, hidden=10, dropout=0.0,
                          name='aux')(x, train)


class TorchConv(tnn.Module):
  def __init__(self, cin, cout, k, stride=1, padding=0, act=True):
    super().__init__()
    self.conv = tnn.Conv2d(cin, cout, k, stride, padding, bias=False)
    self.norm = tnn.BatchNorm2d(cout, eps=1e-5)
    self.act = tnn.ReLU() if act else tnn.Identity()

  def forward(self, x):
    return self.act(self.norm(self.conv(x)))


class TorchBasicBlock(tnn.Module):
  def __init__(self, cin, cout, stride=1):
    super().__init__()
    self.conv1 = TorchConv(cin, cout, 3, stride, 1)
    self.conv2 = TorchConv(cout, cout, 3, 1, 1, act=False)
    self.shortcut = TorchConv(cin, cout, 1, stride, 0, act=False) if stride > 1 else None
    self.relu = tnn.ReLU()

  def forward(self, x):
    shortcut = x if self.shortcut is None else self.shortcut(x)
    return self.relu(self.conv2(self.conv1(x)) + shortcut)


class TorchResidualNet(tnn.Module):
  def __init__(self, cin):
    super().__init__()
    self.conv1 = TorchConv(cin, 6, 3, 1, 1)
    self.pool1 = tnn.MaxPool2d(2)
    self.block1 = TorchBasicBlock(6, 6)
    self.block2 = TorchBasicBlock(6, 8, 2)
    self.head = tnn.ModuleDict({'fc1': tnn.Linear(8, 12), 'fc_out': tnn.Linear(12, 5)})
    self.head_relu = tnn.ReLU()

  def forward(self, x):
    x = self.block2(self.block1(self.pool1(self.conv1(x)))).mean((2, 3))
    return self.head['fc_out'](self.head_relu(self.head['fc1'](x)))


class TorchBranchNet(tnn.Module):
  def __init__(self, cin):
    super().__init__()
    self.stem = TorchConv(cin, 6, 3, 1, 1)
    self.inception = tnn.ModuleDict({
        'branch1': TorchConv(6, 4, 1), 'branch2_reduce': TorchConv(6, 3, 1),
        'branch2': TorchConv(3, 5, 3, 1, 1), 'branch3_reduce': TorchConv(6, 2, 1),
        'branch3': TorchConv(2, 3, 3, 1, 1), 'branch4_proj': TorchConv(6, 3, 1)})
    self.pool = tnn.MaxPool2d(3, 1, 1, ceil_mode=True)
    self.aux = tnn.ModuleDict({'conv': TorchConv(15, 6, 1), 'fc1': tnn.Linear(24, 10),
                               'fc2': tnn.Linear(10, 5)})
    self.aux_relu = tnn.ReLU()
    self.mixed = tnn.Identity()  # the Inception block's output, for LayerGradCam

  def forward(self, x):
    x = self.stem(x)
    b = self.inception
    x = self.mixed(torch.cat([b['branch1'](x), b['branch2'](b['branch2_reduce'](x)),
                              b['branch3'](b['branch3_reduce'](x)),
                              b['branch4_proj'](self.pool(x))], 1))
    x = self.aux['conv'](tnn.functional.adaptive_avg_pool2d(x, 2))
    x = x.permute(0, 2, 3, 1).flatten(1)  # NHWC order, as cnnlab flattens
    return self.aux['fc2'](self.aux_relu(self.aux['fc1'](x)))


def copy_weights(variables, twin):
  """cnnlab's params and batch statistics into the twin's modules of the same dotted names."""
  def walk(tree, path):
    for key, value in tree.items():
      if isinstance(value, dict) or hasattr(value, 'items'):
        yield from walk(value, path + (key,))
      else:
        yield path, key, np.asarray(value)
  with torch.no_grad():
    for path, key, value in walk(variables['params'], ()):
      module = twin.get_submodule('.'.join(path))
      if key == 'kernel':
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        module.weight.copy_(torch.tensor(value))
      else:  # a bias, or a batch norm's scale
        (module.bias if key == 'bias' else module.weight).copy_(torch.tensor(value))
    for path, key, value in walk(variables.get('batch_stats', {}), ()):
      module = twin.get_submodule('.'.join(path))
      {'mean': module.running_mean, 'var': module.running_var}[key].copy_(torch.tensor(value))
  return twin.eval()


def random_variables(model, input_shape, seed):
  """Variables for `model` on (H, W, C) inputs drawn with numpy (no compiled init): He-normal
  kernels, biases ~ N(0, 0.2), batch-norm scale and running variance ~ U(0.5, 1.5), running
  mean ~ N(0, 0.2), so that a swapped mean/var or a missing norm shows."""
  rng = np.random.RandomState(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape)))

  def leaf(path, value):
    name = path[-1].key
    if name == 'kernel':
      draw = rng.normal(0.0, np.sqrt(2.0 / np.prod(value.shape[:-1])), value.shape)
    elif name in ('scale', 'var'):
      draw = rng.uniform(0.5, 1.5, value.shape)
    else:
      draw = rng.normal(0.0, 0.2, value.shape)
    return jnp.asarray(draw, value.dtype)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


TWINS = {
    # name: (model, torch twin, grad_cam layer and its torch module, occlusion window, stride)
    # 'stage1' is a sown value, the output of block1: Grad-CAM taps the module that made it.
    'residual': (ResidualNet, TorchResidualNet, ('stage1', 'block1'), (5, 5), (3, 3)),
    'branch': (BranchNet, TorchBranchNet, ('inception', 'mixed'), (4, 4, 2), (2, 3, 1)),
}


@pytest.fixture(scope='module', params=sorted(TWINS))
def twin(request):
  model_cls, torch_cls, cam_layers, window, stride = TWINS[request.param]
  images = np.random.RandomState(1).randn(3, 10, 10, 3).astype(np.float32)
  model = model_cls()
  variables = random_variables(model, images.shape[1:], 2)
  twin = copy_weights(variables, torch_cls(3))
  target = np.array([0, 3, 4])
  return dict(name=request.param, model=model, variables=variables, twin=twin, images=images,
              target=target,
              cam_layers=cam_layers, window=window, stride=stride)


def nchw(x):
  return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2))


def assert_close(ours, theirs, what):
  """Within 1e-4 of the largest attribution."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, what
  scale = np.abs(theirs).max()
  assert scale > 0, f'{what}: all-zero attributions prove nothing'
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * scale, err_msg=what)


def test_twins_agree_on_logits(twin):
  logits = jax.jit(twin['model'].apply)(twin['variables'], twin['images'])
  expected = twin['twin'](nchw(twin['images'])).detach().numpy()
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('method', ['saliency', 'guided_backprop', 'deconvnet',
                                    'integrated_gradients', 'grad_cam', 'occlusion'])
def test_attributions_equal_captum(twin, method):
  model, t = twin['model'], twin['twin']
  x, target = twin['images'], twin['target']
  layer, torch_layer = twin['cam_layers']
  ours_options = {}
  if method == 'saliency':
    oracle = lambda: captum_attr.Saliency(t).attribute(nchw(x), target=target.tolist())
  elif method == 'guided_backprop':
    oracle = lambda: captum_attr.GuidedBackprop(t).attribute(nchw(x), target=target.tolist())
  elif method == 'deconvnet':
    oracle = lambda: captum_attr.Deconvolution(t).attribute(nchw(x), target=target.tolist())
  elif method == 'integrated_gradients':
    baseline = np.random.RandomState(4).randn(*x.shape).astype(np.float32) * 0.5
    # The residual twin integrates 3 points an evaluation (the last chunk padded), the other all 7.
    batch_size = 8 if twin['name'] == 'residual' else None
    ours_options = dict(steps=7, baseline=baseline, batch_size=batch_size)
    oracle = lambda: captum_attr.IntegratedGradients(t).attribute(
        nchw(x), target=target.tolist(), baselines=nchw(baseline), n_steps=7,
        method='riemann_trapezoid')
  elif method == 'grad_cam':
    ours_options = dict(layer=layer)
    oracle = lambda: captum_attr.LayerGradCam(t, t.get_submodule(torch_layer)).attribute(
        nchw(x), target=target.tolist(), relu_attributions=True)
  else:
    window, stride = twin['window'], twin['stride']
    ours_options = dict(window=window, stride=stride, baseline=-0.2, batch_size=7)
    shape = (window[2] if len(window) == 3 else 3, *window[:2])
    strides = (stride[2] if len(stride) == 3 else 3, *stride[:2])
    oracle = lambda: captum_attr.Occlusion(t).attribute(
        nchw(x), target=target.tolist(), sliding_window_shapes=shape, strides=strides,
        baselines=-0.2)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # Captum's notes about hooks on ReLUs
    expected = oracle().detach().numpy()
  fn = jax.jit(functools.partial(explain.METHODS[method], model, **ours_options))
  ours = fn(twin['variables'], x, jnp.asarray(target))  # the target traced: checked by shape
  if method == 'grad_cam':
    assert_close(ours.cam, expected[:, 0], 'grad_cam at the layer')
    upsampled = torch.nn.functional.interpolate(torch.tensor(expected), size=x.shape[1:3],
                                                mode='bilinear', align_corners=False)
    assert_close(ours.upsampled, upsampled.numpy()[:, 0], 'grad_cam upsampled')
  else:
    assert_close(ours, expected.transpose(0, 2, 3, 1), method)


def test_converted_torchvision_resnet18_agrees_with_captum():
  """The zoo's ResNet (sown stages, residual_activation, the stem's max pool) holding
  torchvision's weights, at 64x64."""
  pretrained = pytest.importorskip('cnnlab.pretrained')
  tv = pytest.importorskip('torchvision.models')
  torch.manual_seed(0)
  net = tv.resnet18(num_classes=7)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, tnn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.1)
        m.running_mean.normal_(0.0, 0.1)
        m.running_var.uniform_(0.5, 2.0)
      if isinstance(m, tnn.ReLU):
        m.inplace = False  # Captum's hooks need the ReLU's input intact
  net = net.eval()
  model, variables = pretrained.from_torchvision('resnet18', net.state_dict())
  x = np.random.RandomState(3).randn(2, 64, 64, 3).astype(np.float32)
  target = np.array([1, 6])
  oracles = {  # the methods that change ReLUs and tap a layer (the twins check the others)
      'guided_backprop': lambda: captum_attr.GuidedBackprop(net).attribute(
          nchw(x), target=target.tolist()),
      'grad_cam': lambda: captum_attr.LayerGradCam(net, net.layer4).attribute(
          nchw(x), target=target.tolist(), relu_attributions=True)}
  for method, oracle in oracles.items():
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      expected = oracle().detach().numpy()
    options = {'layer': 'stage4'} if method == 'grad_cam' else {}
    ours = jax.jit(functools.partial(explain.METHODS[method], model, **options))(
        variables, x, jnp.asarray(target))
    if method == 'grad_cam':
      assert_close(ours.cam, expected[:, 0], method)
    else:
      assert_close(ours, expected.transpose(0, 2, 3, 1), method)


# ---- the ReLU substitution ----

def test_relu_backward_rules():
  x = jnp.array([-1.0, 0.0, 2.0, 3.0, -2.0])
  g = jnp.array([1.0, 1.0, -1.0, 2.0, -3.0])
  expected = {'default': [0, 0, -1, 2, 0], 'guided': [0, 0, 0, 2, 0], 'deconvnet': [1, 1, 0, 2, 0]}
  for mode, want in expected.items():
    with explain.relu_backward(mode):
      value, pullback = jax.vjp(common.relu, x)
    np.testing.assert_array_equal(value, jax.nn.relu(x))
    np.testing.assert_array_equal(pullback(g)[0], np.asarray(want, np.float32))
  assert common.relu_backward_mode() == 'default'
  with pytest.raises(ValueError, match="relu backward.*'guided'"):
    with explain.relu_backward('guidded'):
      pass


def test_every_relu_of_the_layers_is_the_one_function():
  assert layers.activation('relu') is common.relu
  assert layers.activation(jax.nn.relu) is common.relu and layers.activation(nn.relu) is common.relu
  assert layers.activation(jnp.tanh) is jnp.tanh
  for module in (layers.ConvBlock(4, act=jax.nn.relu), layers.BasicBlock(4, act='relu')):
    x = jnp.ones((1, 5, 5, 4))
    variables = random_variables(module, x.shape[1:], 1)
    # A new function for each trace: jax caches a function's trace, and the mode is read by it.
    relus = lambda: probe._count_stray_relus(
        jax.make_jaxpr(lambda x: module.apply(variables, x))(x).jaxpr)
    assert relus() > 0  # outside the block: jax.nn.relu itself
    with explain.relu_backward('deconvnet'):
      assert relus() == 0


@pytest.mark.parametrize('model', [ResidualNet(), BranchNet()])
def test_training_program_is_unchanged(model, monkeypatch):
  """Outside relu_backward training traces the same program as with jax.nn.relu written in every
  layer (and the residual's where-form), with no custom VJP of ours."""
  x = jnp.ones((2, 8, 8, 3))
  variables = random_variables(model, x.shape[1:], 0)

  def program():  # the training forward pass, from which autodiff derives the step's gradient
    return str(jax.make_jaxpr(lambda v: model.apply(v, x, train=True, mutable=['batch_stats']))(
        variables))

  ours = program()
  assert '_guided_relu' not in ours and '_deconvnet_relu' not in ours
  from cnnlab.layers import heads
  monkeypatch.setitem(common.ACTIVATIONS, 'relu', jax.nn.relu)
  monkeypatch.setattr(heads, 'relu', jax.nn.relu)
  assert program() == ours


def test_a_model_calling_jax_relu_directly_is_warned_about():
  class Mine(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.relu(nn.Conv(4, (3, 3))(x))
      return nn.Dense(3)(layers.activation('relu')(x.mean((1, 2))))

  model, x = Mine(), jnp.ones((2, 6, 6, 1))
  variables = random_variables(model, x.shape[1:], 0)
  with pytest.warns(UserWarning, match='jax.nn.relu directly 1 time'):
    explain.guided_backprop(model, variables, x, jnp.array([0, 2]))


# ---- layers, feature maps, filters ----

@pytest.fixture(scope='module')
def stack():
  from cnnlab import models
  model = models.create_model('conv_stack', filters=(4, 6), num_classes=3, pool=('max', 'avg'))
  x = jax.random.normal(jax.random.key(3), (2, 12, 12, 1))
  return model, random_variables(model, x.shape[1:], 4), x


def test_feature_maps_are_the_sown_values_and_module_outputs(stack):
  model, variables, x = stack
  names = ('stage1', 'stage2_conv1', 'stage2_conv1/conv')
  maps = jax.jit(explain.feature_maps, static_argnums=(0, 3))(model, variables, x, names)
  _, state = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True,
                                              mutable=['intermediates']))(variables, x)
  sown, block = state['intermediates']['stage1'], state['intermediates']['stage2_conv1']
  np.testing.assert_array_equal(maps['stage1'], sown[0])  # (capture adds nothing to a sown name)
  np.testing.assert_array_equal(maps['stage2_conv1'], block['__call__'][0])
  np.testing.assert_array_equal(maps['stage2_conv1/conv'], block['conv']['__call__'][0])
  assert explain.list_layers(model, variables, x)['stage2'] == (2, 3, 3, 6)


def test_filters(stack):
  _, variables, _ = stack
  kernel = variables['params']['stage2_conv1']['conv']['kernel']
  np.testing.assert_array_equal(explain.filters(variables, 'stage2_conv1'), kernel)
  np.testing.assert_array_equal(explain.filters(variables, 'stage2_conv1/conv'), kernel)
  with pytest.raises(ValueError,
                     match=r"(?s)'head' holds no convolution.*stage1_conv1/conv  \(3, 3, 1, 4\)"):
    explain.filters(variables, 'head')


# ---- receptive fields ----

def test_empirical_receptive_field_fills_the_analytic_box_of_a_linear_net(tmp_path):
  """Without ReLUs or max-pool switches every weight path counts: the nonzero gradient is exactly
  the analytic box, cut at the image edge, in the corner as in the middle."""
  from cnnlab import models
  model = models.create_model('conv_stack', filters=(3, 3), num_classes=2, act='none',
                              norm='none', pool=('avg', 'none'), stride=(1, 2))
  variables = random_variables(model, (16, 16, 1), 0)
  for position in ((0, 0), (3, 2, 1)):
    field = explain.receptive_field_map(model, variables, 'stage2_conv1', position,
                                        input_shape=(16, 16, 1), num=2)
    top, left, bottom, right = field.box
    assert field.support == (max(top, 0), max(left, 0), min(bottom, 15), min(right, 15))
  assert field.box[2] - field.box[0] + 1 == field.field[0].size == 3 + 1 + 2 * 2  # conv, pool, conv
  out = figures.receptive_field_figure(field, str(tmp_path / 'field.png'))
  with open(out, 'rb') as f:
    assert f.read(8) == PNG


def test_receptive_field_of_a_residual_block_contains_the_gradient(twin):
  model, variables = twin['model'], twin['variables']
  layer = 'block2' if twin['name'] == 'residual' else 'inception'
  field = explain.receptive_field_map(model, variables, layer, (1, 2), images=twin['images'])
  top, left, bottom, right = field.box
  s_top, s_left, s_bottom, s_right = field.support
  assert top <= s_top and left <= s_left and s_bottom <= bottom and s_right <= right
  assert (s_bottom - s_top, s_right - s_left) != (0, 0)


# ---- top activations ----

@pytest.fixture(scope='module')
def loaded_run(stack):
  from cnnlab import config as config_lib
  from cnnlab.inference import LoadedRun
  model, variables, _ = stack
  config = config_lib.load(os.path.join(os.path.dirname(__file__), '..', 'experiments',
                                        'quickstart.py'))
  return LoadedRun(config, model, variables, 0, image_shape=(12, 12, 1), num_classes=3,
                   mean=(0.5,), std=(0.25,))


def test_top_activations_rank_crop_and_project(loaded_run):
  images = np.random.RandomState(5).randint(0, 256, (40, 12, 12, 1)).astype(np.uint8)
  top = explain.top_activations(loaded_run, 'stage2_conv1', 2, images, k=4, batch_size=16)
  maps = explain.feature_maps(loaded_run.model, loaded_run.variables,
                              loaded_run.preprocess(images), 'stage2_conv1')['stage2_conv1']
  best = np.asarray(maps[..., 2]).reshape(40, -1).max(1)
  np.testing.assert_array_equal(top.index, np.argsort(-best, kind='stable')[:4])
  np.testing.assert_allclose(top.value, best[top.index], rtol=1e-6)
  size = int(top.field[0].size)  # conv 3, max-pool 2, conv 3: 8 pixels, every 2
  assert size == 8 and top.patches.shape == (4, size, size, 1)
  for i in range(4):
    box = top.boxes[i]
    np.testing.assert_array_equal(top.patches[i], features.crop(images[top.index[i]], box))
    # The deconvnet projection of one unit lies inside that unit's receptive field.
    outside = np.abs(top.projections[i]).sum() - np.abs(top.projection_patches[i]).sum()
    assert np.abs(top.projection_patches[i]).sum() > 0 and outside < 1e-6
  with pytest.raises(ValueError, match='channel 6 is outside layer'):
    explain.top_activations(loaded_run, 'stage2_conv1', 6, images)


# ---- bad input, before any computation ----

def test_bad_input_fails_with_clear_errors(stack):
  model, variables, x = stack
  target = jnp.array([0, 2])
  with pytest.raises(ValueError,
                     match=r"(?s)no layer 'stage3'.*Did you mean.*stage2_conv1 +\(B, 6, 6, 6\)"):
    explain.grad_cam(model, variables, x, target, layer='stage3')
  with pytest.raises(ValueError, match=r'pre_logits.*not a \(B, h, w, C\)'):
    explain.grad_cam(model, variables, x, target, layer='pre_logits')
  with pytest.raises(ValueError, match=r'target \[3\] out of range.*3 classes'):
    explain.saliency(model, variables, x, jnp.array([0, 3]))
  with pytest.raises(ValueError, match=r'target must be \(2,\) integer'):
    explain.saliency(model, variables, x, jnp.array([0.0, 1.0]))
  with pytest.raises(ValueError, match=r'images of shape \(2, 12, 12, 3\) do not fit ConvStack'):
    explain.integrated_gradients(model, variables, jnp.ones((2, 12, 12, 3)), target)
  with pytest.raises(ValueError, match='must be floating point.*preprocess'):
    explain.saliency(model, variables, np.zeros((2, 12, 12, 1), np.uint8), target)
  with pytest.raises(ValueError, match=r'window \(13, 4, 1\).*larger than the images.*height'):
    explain.occlusion(model, variables, x, target, window=(13, 4))
  with pytest.raises(ValueError, match=r'stride \(5, 5, 5\) is larger than the window'):
    explain.occlusion(model, variables, x, target, window=4, stride=5)
  flat = FlatNet()
  flat_variables = random_variables(flat, x.shape[1:], 0)
  with pytest.raises(ValueError, match=r'images of shape \(2, 10, 10, 1\) do not fit FlatNet'):
    explain.saliency(flat, flat_variables, jnp.ones((2, 10, 10, 1)), target)


class FlatNet(nn.Module):
  """A classifier whose dense layer fixes the input size."""

  @nn.compact
  def __call__(self, x, train=False):
    x = layers.ConvBlock(2, 3, norm='none')(x)
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


# ---- the command ----

@pytest.fixture(scope='module')
def small_run():
  """A LoadedRun (what cnnlab.load_run returns for a run directory) of the quickstart's
  conv_stack, small, on 8x8 synthetic digits (random images, read like any dataset)."""
  from cnnlab import config as config_lib, models
  from cnnlab.inference import LoadedRun
  config = config_lib.load(os.path.join(os.path.dirname(__file__), '..', 'experiments',
                                        'quickstart.py'))
  for key, value in {'data.name': 'synthetic', 'data.synthetic.image_shape': (8, 8, 1),
                     'data.synthetic.num_classes': 10, 'data.synthetic.num_examples': 64,
                     'model.filters': (4, 8), 'model.kernel_size': 3, 'model.stride': 1,
                     'model.pool': 'max'}.items():
    config_lib.set_value(config, key, value)
  model = models.from_config(config, 10)
  variables = random_variables(model, (8, 8, 1), 6)
  return LoadedRun(config, model, variables, 0, image_shape=(8, 8, 1), num_classes=10,
                   mean=(0.3,), std=(0.35,))


def explain_command(*argv):
  parser = argparse.ArgumentParser(prog='cnnlab')
  explain_cli.add_parser(parser.add_subparsers(dest='command'))
  args = parser.parse_args(['explain', *argv])
  return args.func(args)


def test_command_writes_grids_and_arrays(small_run, tmp_path, monkeypatch):
  from cnnlab import inference
  monkeypatch.setattr(inference, 'load_run', lambda workdir, step=None: small_run)
  out = str(tmp_path / 'out')
  assert explain_command(
      '--run', 'RUN', '--method', 'saliency', '--method', 'grad_cam', '--num', '6',
      '--filters', 'stage1_conv1', '--feature-maps', 'stage2', '--top-activations',
      'stage2_conv1', '--channel', '1', '--k', '3', '--limit', '40', '--out', out) == 0
  for name in ('saliency', 'grad_cam', 'filters_stage1_conv1', 'feature_maps_stage2',
               'top_activations_stage2_conv1_c1'):
    with open(os.path.join(out, f'{name}.png'), 'rb') as f:
      assert f.read(8) == PNG
  saved = np.load(os.path.join(out, 'saliency.npz'))
  assert saved['images'].shape == (6, 8, 8, 1) and saved['attributions'].shape == (6, 8, 8, 1)
  x = small_run.preprocess(saved['images'])
  logits = small_run.model.apply(small_run.variables, x)
  np.testing.assert_array_equal(saved['predicted'], np.argmax(logits, -1))
  np.testing.assert_array_equal(saved['target'], saved['predicted'])
  assert saved['labels'].min() >= 0  # the dataset's labels
  np.testing.assert_allclose(saved['attributions'], jax.jit(functools.partial(
      explain.saliency, small_run.model))(small_run.variables, x, saved['target']),
      rtol=1e-5, atol=1e-7)
  cam = np.load(os.path.join(out, 'grad_cam.npz'))  # at the last spatial layer, stage2_pool
  assert cam['cam'].shape == (6, 2, 2) and cam['attributions'].shape == (6, 8, 8)
  top = np.load(os.path.join(out, 'top_activations_stage2_conv1_c1.npz'))
  assert top['index'].shape == (3,) and top['index'].max() < 40
  assert explain_command('--run', 'RUN', '--method', 'saliency', '--indices', '4', '1',
                         '--out', str(tmp_path / 'picked')) == 0  # those examples, in that order
  picked = np.load(str(tmp_path / 'picked' / 'saliency.npz'))
  np.testing.assert_array_equal(picked['images'], saved['images'][[4, 1]])
  np.testing.assert_allclose(picked['attributions'], saved['attributions'][[4, 1]],
                             rtol=1e-5, atol=1e-7)  # another batch size: rounding differs
  with pytest.raises(ValueError, match=r'has examples 0\.\.\d+; asked for \[100000\]'):
    explain_command('--run', 'RUN', '--method', 'saliency', '--indices', '2', '100000',
                    '--out', out)

  from PIL import Image
  npy, png = str(tmp_path / 'mine.npy'), str(tmp_path / 'mine.png')
  np.save(npy, np.random.RandomState(0).randint(0, 256, (5, 16, 16), np.uint8))  # (N, H, W)
  Image.fromarray(np.random.RandomState(1).randint(0, 256, (12, 20, 3), np.uint8)).save(png)
  assert explain_command('--run', 'RUN', '--method', 'saliency', '--images', npy, png,
                         '--out', out) == 0  # grey and colour, both resized to 8x8x1
  saved = np.load(os.path.join(out, 'saliency.npz'))
  assert saved['images'].shape == (6, 8, 8, 1) and saved['labels'].tolist() == [-1] * 6
  with pytest.raises(ValueError, match="no layer 'stage9'"):
    explain_command('--run', 'RUN', '--method', 'grad_cam', '--layer', 'stage9', '--num', '6',
                    '--out', out)
  with pytest.raises(ValueError, match='--target true needs labelled images'):
    explain_command('--run', 'RUN', '--method', 'saliency', '--images', npy, '--target', 'true',
                    '--out', out)
  with pytest.raises(ValueError, match=r'window \(9, 9, 1\) \(h, w, c\) is larger than the images'):
    explain_command('--run', 'RUN', '--method', 'saliency', '--method', 'occlusion', '--window',
                    '9', '--num', '6', '--out', out)  # refused before saliency is computed
  with pytest.raises(ValueError, match="--channel 8 is outside layer 'stage2_conv1'"):
    explain_command('--run', 'RUN', '--top-activations', 'stage2_conv1', '--channel', '8',
                    '--num', '6', '--out', out)
  with pytest.raises(ValueError, match='nothing to explain'):
    explain_command('--run', 'RUN', '--out', out)
