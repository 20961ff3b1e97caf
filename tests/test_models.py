"""Every registered model: right shapes at its natural size in both modes; one model of each
kind compiles and runs finite at another size. The output expected is the one of the task the
model is registered for (registry.TASKS).

Parametrised over list_models(), so a newly registered model is tested the moment it exists.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab import analysis, models, platforms

RNGS = {'params': jax.random.key(0), 'dropout': jax.random.key(1), 'sample': jax.random.key(2)}


def class_kwargs(name, num_classes):
  """The num_classes override, for every model with classes (a reconstruction model has none)."""
  return {} if models.get_spec(name).task == 'reconstruction' else {'num_classes': num_classes}


def expected_shapes(name, batch, input_shape, num_classes, train=False):
  """The output shape(s) a model's task reads (see cnnlab.models.registry); a detector's differ
  between training and detection (cnnlab.models.faster_rcnn)."""
  h, w, c = input_shape
  task = models.get_spec(name).task
  if task == 'detection':
    return detection_shapes(models.create_model(name), batch, input_shape, num_classes, train)
  return {'classification': (batch, num_classes),
          'segmentation': (batch, h, w, num_classes),
          'localization': {'logits': (batch, num_classes), 'box': (batch, 4)},
          'reconstruction': (batch, h, w, c)}[task]


def detection_shapes(model, batch, input_shape, num_classes, train):
  """faster_rcnn's outputs with its default settings (a map of stride 8)."""
  if not train:
    d = model.detections_per_image
    return {'boxes': (batch, d, 4), 'scores': (batch, d), 'labels': (batch, d),
            'num_detections': (batch,)}
  a = (input_shape[0] // 8) * (input_shape[1] // 8) * model.num_anchors
  r = model.box_batch_size_per_image
  return {'rpn_logits': (batch, a), 'rpn_deltas': (batch, a, 4), 'rpn_labels': (batch, a),
          'rpn_targets': (batch, a, 4), 'roi_logits': (batch, r, num_classes + 1),
          'roi_deltas': (batch, r, 4), 'roi_labels': (batch, r), 'roi_targets': (batch, r, 4)}


def train_kwargs(name, batch):
  """What a model needs in training beyond the images: a detector, its targets (none here: N = 2
  padded objects)."""
  if models.get_spec(name).task != 'detection':
    return {}
  return {'targets': {'boxes': jnp.zeros((batch, 2, 4)),
                      'labels': jnp.full((batch, 2), -1, jnp.int32),
                      'num_objects': jnp.zeros((batch,), jnp.int32)}}


def check_dtypes(name, out):
  """Outputs are float32; a detector's labels and counts int32."""
  ints = models.get_spec(name).task == 'detection'
  for leaf in jax.tree.leaves(out):
    integer = ints and jnp.issubdtype(leaf.dtype, jnp.integer)
    assert leaf.dtype == (jnp.int32 if integer else jnp.float32)


def shapes(out):
  """The output's shape, or a dict of shapes for a multi-output model."""
  return {k: v.shape for k, v in out.items()} if isinstance(out, dict) else out.shape


def small_shape(spec):
  """Another input size than the natural one: 64x64 for ImageNet models, else 4 px larger."""
  h, w, c = spec.input_shape
  return (64, 64, c) if h >= 224 else (h + 4, w + 4, c)


@pytest.mark.parametrize('name', models.list_models())
def test_output_shapes_at_natural_size(name):
  spec = models.get_spec(name)
  model = models.create_model(name, **class_kwargs(name, 7))
  x = jax.ShapeDtypeStruct((3, *spec.input_shape), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, RNGS, train=False), x)
  for train in (False, True):
    kwargs = train_kwargs(name, 3) if train else {}
    apply = lambda v, x: model.apply(v, x, train=train, rngs=RNGS,  # noqa: E731
                                     mutable=['batch_stats', 'intermediates'], **kwargs)
    out = jax.eval_shape(platforms.traced_for('cpu', apply), variables, x)[0]
    assert shapes(out) == expected_shapes(name, 3, spec.input_shape, 7, train)
    check_dtypes(name, out)


def variant_key(name):
  """What makes a model a variant of another: its class and the bound arguments that change its
  layers' kinds (norm, block, stem), not their number."""
  from cnnlab.models import registry
  cls, bound = registry._unwrap(models.get_spec(name).factory)
  return (cls, *(repr(bound.get(k)) for k in ('norm', 'block', 'stem')))


def representatives():
  """The smallest registered model of each variant: the depths of a family share every layer
  kind, so running one of them is the test; every model is traced in both modes above."""
  chosen = {}
  for name in sorted(models.list_models(), key=lambda n: (len(n), n)):
    chosen.setdefault(variant_key(name), name)
  return sorted(chosen.values())


# Trained end to end by a shipped experiment (tests/test_experiments.py): their gradients are
# computed there, not again here.
TRAINED_BY_AN_EXPERIMENT = {'conv_stack', 'googlenet', 'resnet18', 'resnet20', 'resnet50',
                            'simple_cnn'}
# Their gradients reach every layer: tests/test_dense_models.py (test_gradients_are_finite_...).
GRADIENTS_IN_TEST_DENSE_MODELS = {'conv_autoencoder', 'fcn', 'localizer', 'unet'}
# Its gradient reaches the backbone, RPN and box head: tests/test_faster_rcnn.py.
GRADIENTS_IN_TEST_FASTER_RCNN = {'faster_rcnn'}
GRADIENTS_ELSEWHERE = (TRAINED_BY_AN_EXPERIMENT | GRADIENTS_IN_TEST_DENSE_MODELS
                       | GRADIENTS_IN_TEST_FASTER_RCNN)


@pytest.mark.parametrize('name', representatives())
def test_compiles_and_runs_in_train_and_eval_mode(name):
  spec = models.get_spec(name)
  # A narrow classifier (AlexNet's and VGG's 4096-wide dense layers hold 100M+ parameters whose
  # drawing and gradients would be most of the test, and test no other layer kind). Only a single
  # width is narrowed: ConvStack's `hidden` is a tuple of widths and is already small.
  width = spec.fields.get('hidden')
  narrow = {'hidden': 64} if isinstance(width, int) and width > 64 else {}
  model = models.create_model(name, **class_kwargs(name, 5), **narrow)
  x = jax.random.normal(jax.random.key(2), (2, *small_shape(spec)))

  # Traced for CPU, as cnnlab traces its train and evaluation steps (cnnlab.platforms).
  @jax.jit
  @functools.partial(platforms.traced_for, 'cpu')
  def run(x):
    variables = model.init(RNGS, x, train=False)

    def train(params):
      out, updates = model.apply({**variables, 'params': params}, x, train=True,
                                 rngs={'dropout': jax.random.key(3), 'sample': jax.random.key(4)},
                                 mutable=['batch_stats', 'intermediates'],
                                 **train_kwargs(name, x.shape[0]))
      return sum(jnp.sum(leaf ** 2) for leaf in jax.tree.leaves(out)
                 if jnp.issubdtype(leaf.dtype, jnp.floating)), (out, updates)
    if name in GRADIENTS_ELSEWHERE:
      grads, (train_out, updates) = {}, train(variables['params'])[1]
    else:
      grads, (train_out, updates) = jax.grad(train, has_aux=True)(variables['params'])
    eval_out = model.apply(variables, x, train=False)
    again = model.apply(variables, x, train=False)
    return train_out, eval_out, again, updates, grads

  # It runs once: compiled without LLVM's optimisations, as cnnlab compiles an initial state.
  compiled = run.lower(x).compile(compiler_options={'xla_backend_optimization_level': 0})
  train_out, eval_out, again, updates, grads = compiled(x)
  assert shapes(train_out) == expected_shapes(name, 2, x.shape[1:], 5, train=True)
  assert shapes(eval_out) == expected_shapes(name, 2, x.shape[1:], 5)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves((train_out, eval_out)))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert name in GRADIENTS_ELSEWHERE or any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
  jax.tree.map(np.testing.assert_array_equal, eval_out, again)  # eval mode is deterministic
  assert updates['intermediates'], 'models sow per-stage features into intermediates'
  if 'batch_stats' in updates and shapes(train_out) == shapes(eval_out):
    # batch statistics differ from running ones
    flat = lambda out: np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(out)])
    assert not np.allclose(flat(train_out), flat(eval_out))


# Parameter counts of torchvision's models for the same configuration (1000 classes, 224x224x3).
TORCHVISION = {
    'alexnet': 61_100_840, 'vgg11': 132_863_336, 'vgg11_bn': 132_868_840, 'vgg16': 138_357_544,
    'vgg19': 143_667_240, 'resnet18': 11_689_512, 'resnet34': 21_797_672, 'resnet50': 25_557_032,
    'resnet101': 44_549_160, 'resnet152': 60_192_808, 'googlenet': 13_004_888,
}


@pytest.mark.parametrize('name,count', sorted(TORCHVISION.items()))
def test_parameter_counts_equal_torchvision(name, count):
  assert analysis.count_params(models.create_model(name), (224, 224, 3)) == count


def test_googlenet_without_aux_heads():
  assert analysis.count_params(models.create_model('googlenet', aux_logits=False), (224, 224, 3)) == 6_624_904


@pytest.mark.parametrize('name,shape,count', [
    ('simple_cnn', (32, 32, 3), 10_002),       # the seeds' classic
    ('lenet5', (32, 32, 1), 61_706),           # LeCun et al. 1998
    ('resnet20', (32, 32, 3), 269_722),        # He et al. 2015, Table 6: 0.27M
    ('resnet56', (32, 32, 3), 853_018),        # 0.85M
    ('resnet110', (32, 32, 3), 1_727_962),     # 1.7M
])
def test_classic_parameter_counts(name, shape, count):
  assert analysis.count_params(models.create_model(name), shape) == count


def test_simple_cnn_works_on_28x28x1():
  model = models.create_model('simple_cnn')
  out, _ = jax.eval_shape(lambda x: model.init_with_output(RNGS, x), jnp.zeros((4, 28, 28, 1)))
  assert out.shape == (4, 10)


def test_googlenet_aux_logits_only_when_training():
  model = models.create_model('googlenet', num_classes=4)
  x = jax.ShapeDtypeStruct((2, 96, 96, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, RNGS), x)
  def sown(train):
    _, state = jax.eval_shape(lambda v, x: model.apply(v, x, train=train, rngs=RNGS,
                                                       mutable=['intermediates', 'batch_stats']), variables, x)
    return state['intermediates']
  assert sown(True)['aux1_logits'][0].shape == (2, 4) and 'aux2_logits' in sown(True)
  assert 'aux1_logits' not in sown(False)
  no_aux = models.create_model('googlenet', num_classes=4, aux_logits=False)
  _, state = jax.eval_shape(lambda x: no_aux.init_with_output(RNGS, x, train=True), x)
  assert 'aux1' not in state['params']


def test_resnet_cifar_stem_keeps_resolution():
  model = models.create_model('resnet18', stem='cifar', num_classes=10)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, RNGS), x)
  _, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=['intermediates']), variables, x)
  assert state['intermediates']['stem'][0].shape == (1, 32, 32, 64)
  assert state['intermediates']['stage4'][0].shape == (1, 4, 4, 512)
  assert 'stem_pool' not in str(analysis.summarize(model, (32, 32, 3)))


def test_conv_stack_per_stage_arguments():
  model = models.create_model('conv_stack', filters=(8, 16, 32), kernel_size=(3, 5, 7),
                              stride=2, pool=('max', 'avg', 'none'), head='flatten', hidden=(20,))
  rows = {r.name: r for r in analysis.summarize(model, (64, 64, 1)).layers}
  assert rows['stage2_conv1'].params == 5 * 5 * 8 * 16 + 2 * 16  # conv (no bias) + batch norm
  assert 'stage3_pool' not in rows and rows['stage2_pool'].kind == 'avg_pool'
  assert rows['stage3_conv1'].output_shape == (2, 2, 32)  # 64 -> 32 -> 16 -> 8 -> 4 -> 2


def test_conv_stack_strided_conv_replaces_pooling():
  pooled = models.create_model('conv_stack', pool='max', stride=1)
  strided = models.create_model('conv_stack', pool='none', stride=2)
  a = analysis.summarize(pooled, (28, 28, 1)).layers
  b = analysis.summarize(strided, (28, 28, 1)).layers
  assert a[-3].output_shape == b[-3].output_shape == (7, 7, 64)  # the same downsampling


def test_unknown_model_lists_the_available_names():
  with pytest.raises(ValueError, match='resnet18') as e:
    models.create_model('resnet19')
  assert 'Did you mean' in str(e.value) and 'simple_cnn' in str(e.value)


def test_unknown_override_names_the_argument():
  with pytest.raises(ValueError, match="no argument 'num_clases'.*num_classes"):
    models.create_model('resnet18', num_clases=10)


def test_bad_conv_stack_arguments():
  with pytest.raises(ValueError, match='kernel_size has 2 values but there are 3 stages'):
    models.create_model('conv_stack', filters=(8, 8, 8), kernel_size=(3, 3))
  with pytest.raises(ValueError, match='pool'):
    models.create_model('conv_stack', pool='median')
  with pytest.raises(ValueError, match='kernel_size'):
    models.create_model('conv_stack', kernel_size=0)


def test_input_too_small_names_the_layer():
  model = models.create_model('alexnet')
  with pytest.raises(ValueError, match='pool5.*too small'):
    jax.eval_shape(functools.partial(model.init, RNGS), jnp.zeros((1, 32, 32, 3)))


def test_user_model_registered_from_outside(tmp_path, monkeypatch):
  from cnnlab.models import registry
  # The registry is global: this test's model leaves it with the test.
  monkeypatch.setattr(registry, '_REGISTRY', dict(registry._REGISTRY))
  (tmp_path / 'my_models.py').write_text('''
import flax.linen as nn
from cnnlab.models import register

@register('tiny_user_net', input_shape=(8, 8, 1), num_classes=3)
class TinyUserNet(nn.Module):
  num_classes: int = 3
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3))(x)
    return nn.Dense(self.num_classes)(x.mean((1, 2)))
''')
  monkeypatch.syspath_prepend(str(tmp_path))
  models.import_modules(['my_models'])
  assert 'tiny_user_net' in models.list_models()
  model = models.create_model('tiny_user_net', num_classes=2)
  out, _ = jax.eval_shape(lambda x: model.init_with_output(RNGS, x), jnp.zeros((1, 8, 8, 1)))
  assert out.shape == (1, 2)
  with pytest.raises(ValueError, match='cannot import model module'):
    models.import_modules(['no_such_module_here'])
  with pytest.raises(TypeError, match='flax.linen.Module'):
    models.register('not_a_module')(lambda: None)


@pytest.mark.parametrize('name', models.list_models())
def test_a_model_that_can_batch_norm_takes_the_pmap_axis(name):
  """Under pmap the batch statistics must span the replicas (bn_axis_name); a model that can
  have batch norm without that argument keeps one set of statistics per replica."""
  fields = models.get_spec(name).fields
  kwargs = {'norm': 'batch'} if 'norm' in fields else {}
  model = models.create_model(name, **class_kwargs(name, 3), **kwargs)
  shape = (1, *models.get_spec(name).input_shape)
  variables = jax.eval_shape(functools.partial(model.init, RNGS), jnp.zeros(shape))
  if 'batch_stats' in variables:
    assert 'bn_axis_name' in fields
