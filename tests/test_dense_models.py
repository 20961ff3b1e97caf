"""Models for dense tasks (unet, fcn, conv_autoencoder/conv_encoder, localizer) and the backbone
conventions they build on (num_classes=0, features_only): output contracts, parameter names,
the bilinear upsampling, the encoder hand-over, box validity, gradients.

Small inputs and channels throughout; `jax.eval_shape` wherever only shapes matter.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cnnlab import models
from cnnlab.layers.upsample import UpBlock, bilinear_kernel_init, upsampling_geometry
from cnnlab.models.localizer import box_from_centre_size

RNGS = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
TINY_STACK = {'filters': (4, 4, 8, 8, 8)}  # conv_stack with strides 2..32, few channels


def abstract(model, shape, train=False, dtype=jnp.float32):
  """(output, variables, intermediates) of `model` on a (B, H, W, C) input, shapes only."""
  x = jax.ShapeDtypeStruct(shape, dtype)

  def run(x):
    variables = model.init(RNGS, x, train=False)
    out, state = model.apply(variables, x, train=train, rngs=RNGS,
                             mutable=['batch_stats', 'intermediates'])
    return out, variables, state['intermediates']
  return jax.eval_shape(run, x)


def run_once(fn, *args):
  """fn(*args) jitted for one call: compiled without LLVM's optimisations, which would cost far
  more time than they save on these small inputs (as test_models does)."""
  lowered = jax.jit(fn).lower(*args)
  return lowered.compile(compiler_options={'xla_backend_optimization_level': 0})(*args)


def tree_shapes(tree):
  return jax.tree.map(lambda a: a.shape, tree)


# --- the output contract of each task -------------------------------------------------------

CASES = [  # (model, overrides, input shape (B, H, W, C), expected output shapes)
    ('unet', {}, (2, 64, 64, 3), (2, 64, 64, 5)),
    ('unet', {'upsample': 'bilinear', 'features': (4, 8, 8, 16), 'num_classes': 3},
     (1, 40, 24, 1), (1, 40, 24, 3)),
    ('fcn', {}, (2, 64, 64, 3), (2, 64, 64, 5)),
    # 68 and 40 are no multiples of 32: floor-pooled maps, extended by output padding.
    ('fcn', {'backbone_args': TINY_STACK, 'variant': '16s'}, (1, 68, 40, 3), (1, 68, 40, 5)),
    # ResNet's SAME-padded strides round up (68 -> 17 -> 9 -> 5 -> 3): upsampled maps cropped.
    ('fcn', {'backbone': 'resnet18', 'backbone_args': {'widths': (4, 8, 8, 8)}, 'num_classes': 2},
     (1, 68, 68, 3), (1, 68, 68, 2)),
    ('fcn', {'backbone_args': TINY_STACK, 'variant': '32s', 'learn_upsampling': False},
     (1, 64, 64, 3), (1, 64, 64, 5)),
    ('conv_autoencoder', {}, (2, 28, 28, 1), (2, 28, 28, 1)),
    ('conv_autoencoder', {'downsample': 'pool', 'code_dim': 16, 'features': (4, 8, 8)},
     (1, 30, 27, 3), (1, 30, 27, 3)),
    ('conv_autoencoder', {'out_channels': 2, 'features': (4,)}, (1, 9, 9, 1), (1, 9, 9, 2)),
    ('conv_encoder', {}, (2, 28, 28, 1), (2, 10)),
    ('localizer', {}, (2, 64, 64, 3), {'logits': (2, 4), 'box': (2, 4)}),
    ('localizer', {'backbone': 'resnet20', 'box_hidden': 8, 'num_classes': 3}, (1, 32, 32, 3),
     {'logits': (1, 3), 'box': (1, 4)}),
    ('localizer', {'backbone': 'conv_encoder'}, (1, 28, 28, 1), {'logits': (1, 4), 'box': (1, 4)}),
]


@pytest.mark.parametrize('name,overrides,shape,expected', CASES)
def test_output_contract(name, overrides, shape, expected):
  model = models.create_model(name, **overrides)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)

  def run(x):  # both modes in one trace
    variables = model.init(RNGS, x, train=False)
    return [model.apply(variables, x, train=train, rngs=RNGS, mutable=['batch_stats'])[0]
            for train in (False, True)]
  for out in jax.eval_shape(run, x):
    assert tree_shapes(out) == expected
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(out))


@pytest.mark.parametrize('name,sown', [
    ('unet', ('encoder1',)), ('fcn', ('backbone', 'stage1')), ('conv_autoencoder', ('code',)),
    ('conv_encoder', ('stage1',)), ('localizer', ('backbone', 'pre_logits'))])
def test_compute_dtype_is_honoured(name, sown):
  spec = models.get_spec(name)
  model = models.create_model(name, dtype=jnp.bfloat16)
  out, variables, inter = abstract(model, (1, *spec.input_shape), dtype=jnp.bfloat16)
  for key in sown:
    inter = inter[key]
  assert inter[0].dtype == jnp.bfloat16  # computed in bfloat16 ...
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))  # fp32 params
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(out))  # ... logits widened


def test_registered_tasks_and_natural_settings():
  expected = {'unet': ('segmentation', (64, 64, 3), 5), 'fcn': ('segmentation', (64, 64, 3), 5),
              'localizer': ('localization', (64, 64, 3), 4),
              'faster_rcnn': ('detection', (64, 64, 3), 4),
              'conv_autoencoder': ('reconstruction', (28, 28, 1), 0),
              'conv_encoder': ('classification', (28, 28, 1), 10),
              'resnet18': ('classification', (224, 224, 3), 1000)}
  for name, (task, shape, classes) in expected.items():
    spec = models.get_spec(name)
    assert (spec.task, spec.input_shape, spec.num_classes) == (task, shape, classes), name
  assert {models.get_spec(n).task for n in models.list_models()} <= set(models.TASKS)


def test_register_rejects_an_unknown_task():
  with pytest.raises(ValueError, match="task must be one of .*'detection'"):
    models.register('never_registered', task='keypoints')


def config_for(name, **model):
  config = ml_collections.ConfigDict({'dtype': 'float32', 'model': {'name': name, 'imports': (),
                                                                    'num_classes': None, **model}})
  return config


def test_from_config_passes_classes_except_to_a_reconstruction_model():
  assert models.from_config(config_for('unet'), num_classes=3).num_classes == 3
  autoencoder = models.from_config(config_for('conv_autoencoder', noise_std=0.1), num_classes=10)
  assert autoencoder.noise_std == 0.1 and not hasattr(autoencoder, 'num_classes')
  # A config's backbone_args arrive as a dict with lists; the model freezes them (hashable).
  fcn = models.from_config(config_for('fcn', backbone_args={'filters': [4, 4, 8, 8, 8]}), 2)
  assert fcn.backbone_args['filters'] == (4, 4, 8, 8, 8) and hash(fcn) is not None


# --- timm's backbone conventions on conv_stack and the ResNets --------------------------------

@pytest.mark.parametrize('name,shape,features,maps', [
    ('conv_stack', (2, 28, 28, 1), 64, [(2, 14, 14, 32), (2, 7, 7, 64)]),
    ('resnet18', (2, 64, 64, 3), 512, [(2, 16, 16, 64), (2, 8, 8, 128), (2, 4, 4, 256),
                                       (2, 2, 2, 512)]),
    ('resnet20', (2, 32, 32, 3), 64, [(2, 32, 32, 16), (2, 16, 16, 32), (2, 8, 8, 64)]),
])
def test_num_classes_zero_and_features_only(name, shape, features, maps):
  pooled, variables, _ = abstract(models.create_model(name, num_classes=0), shape)
  assert pooled.shape == (shape[0], features)
  assert 'head' not in variables['params']  # no classifier layer at all
  model = models.create_model(name, features_only=True)
  feature_maps, variables, _ = abstract(model, shape)
  assert [m.shape for m in feature_maps] == maps
  assert 'head' not in variables['params']
  # The strides it reports are the maps' (the inputs here are multiples of them).
  assert [shape[1] // r for r in model.feature_reductions()] == [m[1] for m in maps]


def test_classifier_parameter_names_are_unchanged():
  _, variables, _ = abstract(models.create_model('conv_stack'), (1, 28, 28, 1))
  assert tree_shapes(variables['params']) == {
      'stage1_conv1': {'conv': {'kernel': (3, 3, 1, 32)}, 'norm': {'bias': (32,), 'scale': (32,)}},
      'stage2_conv1': {'conv': {'kernel': (3, 3, 32, 64)}, 'norm': {'bias': (64,), 'scale': (64,)}},
      'head': {'bias': (10,), 'kernel': (64, 10)}}
  _, variables, _ = abstract(models.create_model('resnet18'), (1, 64, 64, 3))
  params = variables['params']
  assert sorted(params) == ['head', 'stage1_block1', 'stage1_block2', 'stage2_block1',
                            'stage2_block2', 'stage3_block1', 'stage3_block2', 'stage4_block1',
                            'stage4_block2', 'stem_conv']
  assert params['stage2_block1']['conv2']['conv']['kernel'].shape == (3, 3, 128, 128)
  assert params['head']['kernel'].shape == (512, 1000)


def test_a_backbone_holds_the_classifier_parameters_less_its_head():
  """Transfer learning: a trained classifier's params (without 'head') are the dense model's
  params['backbone']."""
  classifier = abstract(models.create_model('conv_stack', **TINY_STACK), (1, 64, 64, 3))[1]
  for name in ('fcn', 'localizer'):
    dense = abstract(models.create_model(name, backbone_args=TINY_STACK), (1, 64, 64, 3))[1]
    for collection in ('params', 'batch_stats'):
      expected = {k: v for k, v in classifier[collection].items() if k != 'head'}
      assert tree_shapes(dense[collection]['backbone']) == tree_shapes(expected)


@pytest.mark.parametrize('owner,backbone', [('fcn', 'alexnet'), ('localizer', 'vgg11'),
                                            ('fcn', 'simple_cnn')])
def test_a_backbone_without_the_conventions_is_refused_by_name(owner, backbone):
  match = f"{owner}: backbone '{backbone}' does not support.*resnet18"
  with pytest.raises(ValueError, match=match):
    models.create_model(owner, backbone=backbone)


def test_bad_backbone_args_name_the_argument():
  with pytest.raises(ValueError, match="no argument 'filter'.*Did you mean 'filters'"):
    models.create_model('fcn', backbone_args={'filter': (8,)})
  with pytest.raises(ValueError, match="must not set 'num_classes'"):
    models.create_model('localizer', backbone_args={'num_classes': 3})
  with pytest.raises(ValueError, match="unknown model 'resnet19'"):
    models.create_model('localizer', backbone='resnet19')
  with pytest.raises(ValueError, match="variant '8s' scores the last 3 stages.*has 2"):
    abstract(models.create_model('fcn', backbone_args={'filters': (4, 8)}), (1, 32, 32, 3))


# --- U-Net ----------------------------------------------------------------------------------

def test_unet_concatenates_skips_and_names_its_layers():
  _, variables, _ = abstract(models.create_model('unet'), (1, 64, 64, 3))
  params = variables['params']
  assert sorted(params) == sorted(
      [f'down{i}_conv{j}' for i in (1, 2, 3) for j in (1, 2)] + ['up2', 'up1', 'head']
      + [f'up{i}_conv{j}' for i in (1, 2) for j in (1, 2)])
  assert params['up2']['conv']['kernel'].shape == (2, 2, 64, 128)  # 2x2 transposed conv, halving
  # The first conv after a concatenation sees the skip's and the upsampled channels.
  assert params['up1_conv1']['conv']['kernel'].shape == (3, 3, 64, 32)
  assert params['head']['conv']['kernel'].shape == (1, 1, 32, 5)
  _, variables, _ = abstract(models.create_model('unet', upsample='bilinear'), (1, 64, 64, 3))
  assert variables['params']['up2']['conv']['kernel'].shape == (3, 3, 128, 64)


def test_unet_input_not_divisible_fails_naming_size_and_divisor():
  model = models.create_model('unet', features=(4, 8, 8, 8))
  with pytest.raises(ValueError, match=r'input size 64x36 must be divisible by 8'):
    abstract(model, (1, 64, 36, 3))
  abstract(model, (1, 64, 40, 3))  # 40 = 5 x 8 is fine


@pytest.mark.parametrize('name,overrides,match', [
    ('unet', {'features': ()}, 'features must name at least one level'),
    ('unet', {'upsample': 'nearest'}, "upsample must be one of .*'nearest'"),
    ('unet', {'norm': 'instance'}, 'norm'),
    ('unet', {'num_classes': 0}, 'num_classes must be an int >= 1, got 0'),
    ('localizer', {'num_classes': 0}, 'num_classes must be an int >= 1'),
    ('fcn', {'variant': '4s'}, "variant must be one of .*'4s'"),
    ('conv_autoencoder', {'kernel_size': 4}, 'kernel_size must be odd'),
    ('conv_autoencoder', {'downsample': 'avg'}, "downsample must be one of .*'avg'"),
    ('conv_autoencoder', {'noise_std': -0.1}, 'noise_std must be >= 0'),
    ('conv_autoencoder', {'code_dim': 0}, 'code_dim must be a positive integer'),
    ('conv_encoder', {'head': 'global_max'}, "head must be one of .*'global_max'"),
    ('conv_stack', {'num_classes': -1}, 'num_classes must be an int >= 0'),
    ('resnet18', {'num_classes': -1}, 'num_classes must be an int >= 0'),
    ('localizer', {'box_hidden': -1}, 'box_hidden must be an int >= 0'),
])
def test_bad_arguments_are_named(name, overrides, match):
  with pytest.raises(ValueError, match=match):
    models.create_model(name, **overrides)


# --- FCN and the bilinear upsampling --------------------------------------------------------

FACTORS = (2, 3, 4)


@functools.cache
def upsampled():
  """{f: (bilinear transposed conv, the same fixed, jax.image.resize)} of one positive input
  (B, 5, 4, 3), all factors in one compilation."""
  x = jax.random.uniform(jax.random.key(0), (2, 5, 4, 3), minval=0.5, maxval=1.5)

  def run(x):
    out = {}
    for f in FACTORS:
      kernel, padding = upsampling_geometry(f)
      block = functools.partial(UpBlock, 3, kernel, f, padding, norm='none', act='none',
                                use_bias=False, kernel_init=bilinear_kernel_init)
      learnt = block().init_with_output(jax.random.key(1), x)[0]
      fixed, variables = block(learnable=False).init_with_output(jax.random.key(1), x)
      assert not variables  # fixed: a constant kernel, no parameter
      out[f] = (learnt, fixed, jax.image.resize(x, (2, 5 * f, 4 * f, 3), 'bilinear'))
    return out
  return run_once(run, x)


@pytest.mark.parametrize('factor', FACTORS)
def test_bilinear_transposed_convolution_equals_image_resize_inside(factor):
  """The transposed convolution of kernel 2f (2f - 1 for odd f), stride f, padding f // 2, with the
  bilinear kernel, samples output pixel j at input coordinate (j + 0.5) / f - 0.5, as
  jax.image.resize's half-pixel bilinear does, so the two agree wherever that coordinate lies
  between the first and last input pixel centres: j in [f // 2, n f - f // 2) per dim. On the f // 2
  pixels outside it the resize clamps to the edge pixel while the convolution's missing neighbour
  is zero padding, so they differ there (checked too, so the interior is the exact boundary)."""
  assert upsampling_geometry(factor) == (2 * factor - factor % 2, factor // 2)
  y, fixed, resized = upsampled()[factor]
  assert y.shape == resized.shape == (2, 5 * factor, 4 * factor, 3)
  b = factor // 2
  np.testing.assert_allclose(y[:, b:-b, b:-b], resized[:, b:-b, b:-b], rtol=1e-6, atol=1e-6)
  edges = np.abs(np.asarray(y - resized))
  for border in (edges[:, :b], edges[:, -b:], edges[:, :, :b], edges[:, :, -b:]):
    assert border.min() > 1e-3  # positive inputs: zero padding always pulls the border down
  # Fixed (learnable=False): the same numbers, from a constant kernel rather than a parameter.
  np.testing.assert_allclose(fixed, y, rtol=1e-6, atol=1e-6)


def test_bilinear_kernel_needs_as_many_inputs_as_outputs():
  with pytest.raises(ValueError, match=r'as many input as output channels.*\(4, 4, 2, 3\)'):
    bilinear_kernel_init(None, (4, 4, 2, 3))


@pytest.mark.parametrize('variant,scored', [('32s', (5,)), ('16s', (4, 5)), ('8s', (3, 4, 5))])
def test_fcn_variants_score_the_last_stages(variant, scored):
  model = models.create_model('fcn', backbone_args=TINY_STACK, variant=variant)
  _, variables, _ = abstract(model, (1, 64, 64, 3))
  params = variables['params']
  assert sorted(k for k in params if k != 'backbone') == sorted(
      [f'score_stage{i}' for i in scored] + [f'up_stage{i}' for i in scored])
  # Long et al.'s kernel 2f: f = the stride of the finest scored stage for the final upsampling
  # to the input, 2 between stages.
  reductions = {3: 8, 4: 16, 5: 32}
  for i in scored:
    factor = reductions[i] if i == scored[0] else 2
    assert params[f'up_stage{i}']['conv']['kernel'].shape == (2 * factor, 2 * factor, 5, 5)


def test_fcn_starts_from_bilinear_upsampling_and_zero_skip_scores():
  params = computed('fcn')['variables']['params']  # an FCN-8s
  for i in (3, 4, 5):
    kernel = params[f'up_stage{i}']['conv']['kernel']
    np.testing.assert_array_equal(kernel, bilinear_kernel_init(None, kernel.shape))
  # The skip stages' scores start at zero (the net starts as FCN-32s), the last stage's do not.
  assert np.abs(params['score_stage5']['conv']['kernel']).max() > 0
  for i in (3, 4):
    assert np.abs(params[f'score_stage{i}']['conv']['kernel']).max() == 0


def test_fcn_can_keep_the_final_upsampling_fixed():
  model = models.create_model('fcn', backbone_args=TINY_STACK, learn_upsampling=False)
  _, variables, _ = abstract(model, (1, 64, 64, 3))
  assert 'up_stage3' not in variables['params']  # the final upsampling: a constant
  assert {'up_stage4', 'up_stage5'} <= set(variables['params'])  # the 2x ones learn


# --- the autoencoder and its encoder -------------------------------------------------------

@pytest.mark.parametrize('overrides', [{}, {'downsample': 'pool', 'code_dim': 12}])
def test_autoencoder_encoder_has_the_classifier_encoder_structure(overrides):
  autoencoder = models.create_model('conv_autoencoder', **overrides)
  classifier = models.create_model('conv_encoder', **overrides)
  ae_vars = abstract(autoencoder, (1, 28, 28, 1))[1]
  clf_vars = abstract(classifier, (1, 28, 28, 1))[1]
  assert sorted(ae_vars['params']) == ['decoder', 'encoder']
  assert sorted(clf_vars['params']) == ['encoder', 'head']
  for collection in ('params', 'batch_stats'):
    encoders = ae_vars[collection]['encoder'], clf_vars[collection]['encoder']
    assert tree_shapes(encoders[0]) == tree_shapes(encoders[1])
  assert ('code' in ae_vars['params']['encoder']) == ('code_dim' in overrides)


def test_a_copied_encoder_gives_the_classifier_the_autoencoder_code():
  """The linear probe's features: conv_encoder(num_classes=0) with the autoencoder's encoder
  computes autoencoder.encode."""
  kwargs = {'features': (4, 8), 'downsample': 'pool', 'code_dim': 12}
  autoencoder = models.create_model('conv_autoencoder', **kwargs)
  classifier = models.create_model('conv_encoder', num_classes=0, **kwargs)
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))

  def run(x):
    ae_vars = autoencoder.init(RNGS, x)
    clf_vars = classifier.init(jax.random.key(5), x)
    copied = {c: {**clf_vars[c], 'encoder': ae_vars[c]['encoder']} for c in clf_vars}
    _, state = autoencoder.apply(ae_vars, x, mutable=['intermediates'])
    return (autoencoder.apply(ae_vars, x, method='encode'), classifier.apply(copied, x),
            classifier.apply(clf_vars, x), state['intermediates'])
  code, features, other, intermediates = run_once(run, x)
  assert code.shape == (2, 12) and intermediates['code'][0].shape == (2, 12)
  np.testing.assert_allclose(features, code, rtol=1e-5, atol=1e-6)
  assert not np.allclose(other, code)  # (the classifier's own encoder computes something else)


def test_encode_flattens_a_conv_code():
  model = models.create_model('conv_autoencoder')
  x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
  code = jax.eval_shape(lambda x: model.apply(model.init(RNGS, x), x, method='encode'), x)
  assert code.shape == (2, 7 * 7 * 64)


def test_classifier_head_reads_the_code():
  _, variables, _ = abstract(models.create_model('conv_encoder'), (1, 28, 28, 1))
  assert variables['params']['head']['kernel'].shape == (7 * 7 * 64, 10)
  _, variables, _ = abstract(models.create_model('conv_encoder', head='global_avg'), (1, 28, 28, 1))
  assert variables['params']['head']['kernel'].shape == (64, 10)


def test_denoising_noise_only_in_training_from_the_dropout_stream():
  model = models.create_model('conv_autoencoder', features=(4,), norm='none', noise_std=0.5)
  quiet = models.create_model('conv_autoencoder', features=(4,), norm='none')
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 1))

  def run(x):
    variables = model.init(RNGS, x)
    noisy = [model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(k)})
             for k in (3, 3, 4)]
    clean = model.apply(variables, x, train=False)  # no rng needed in evaluation
    return noisy, clean, quiet.apply(variables, x, train=True)
  (a, again, b), clean, quiet_train = run_once(run, x)
  np.testing.assert_array_equal(a, again)
  assert not np.allclose(a, b) and not np.allclose(a, clean)
  np.testing.assert_array_equal(quiet_train, clean)


# --- the localizer's box --------------------------------------------------------------------

def test_box_from_centre_size():
  raw = 8 * np.random.default_rng(0).normal(size=(4096, 4)).astype(np.float32)  # saturating
  raw[0] = 0  # centre 0.5, size 0.5
  box = np.asarray(run_once(box_from_centre_size, raw))
  np.testing.assert_allclose(box[0], [0.25, 0.25, 0.75, 0.75])
  assert (0 <= box).all() and (box <= 1).all()
  assert (box[:, 0] <= box[:, 2]).all() and (box[:, 1] <= box[:, 3]).all()
  assert (box == 0).any() and (box == 1).any()  # the clipping was exercised


def test_localizer_boxes_are_valid_on_random_inputs():
  run = computed('localizer')
  for mode in ('eval', 'train'):
    box = np.asarray(run[mode]['box'])
    assert box.shape == (8, 4) and run[mode]['logits'].shape == (8, 4)
    assert (0 <= box).all() and (box <= 1).all()
    assert (box[:, :2] <= box[:, 2:]).all()
  assert np.asarray(run['train']['box']).std(0).min() > 0  # the boxes depend on the image
  # The large inputs saturate the evaluation-mode sigmoids: the clipping was exercised.
  assert (run['eval']['box'] == 0).any() or (run['eval']['box'] == 1).any()


# --- one compiled run per model: initial variables, outputs, gradients ------------------------

# conv_encoder's layers are the autoencoder's encoder and a dense head: its gradients are
# test_models' (which leaves those of the models here to this file).
RUNS = {  # name: (overrides, input shape, input scale)
    'unet': ({'features': (4, 8)}, (2, 8, 8, 3), 1.0),
    'fcn': ({'backbone_args': TINY_STACK}, (2, 32, 32, 3), 1.0),
    'conv_autoencoder': ({'features': (4, 8), 'code_dim': 6, 'noise_std': 0.1}, (2, 12, 12, 1),
                         1.0),
    # Large inputs: running statistics at their initial values do not normalise them.
    'localizer': ({'backbone_args': {'filters': (4, 8)}, 'box_hidden': 4}, (8, 16, 16, 3), 30.0),
}


@functools.cache
def computed(name):
  """{'variables', 'eval', 'train', 'grads'} of a small `name`, in one compilation: gradients of a
  fixed random weighting of the training-mode outputs (a plain sum is flat through batch norm)."""
  overrides, shape, scale = RUNS[name]
  model = models.create_model(name, **overrides)
  x = scale * jax.random.normal(jax.random.key(0), shape)

  def run(x):
    variables = model.init(RNGS, x)

    def loss(params):
      out, _ = model.apply({**variables, 'params': params}, x, train=True, rngs=RNGS,
                           mutable=['batch_stats'])
      leaves = jax.tree.leaves(out)
      weights = [jax.random.normal(jax.random.key(i), leaf.shape) for i, leaf in enumerate(leaves)]
      return sum(jnp.sum(w * leaf) for w, leaf in zip(weights, leaves)), out
    grads, train_out = jax.grad(loss, has_aux=True)(variables['params'])
    return {'variables': variables, 'eval': model.apply(variables, x, train=False),
            'train': train_out, 'grads': grads}
  return run_once(run, x)


@pytest.mark.parametrize('name', sorted(RUNS))
def test_gradients_are_finite_and_reach_every_layer(name):
  grads = computed(name)['grads']
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(grads))
  kernels = [(jax.tree_util.keystr(path), leaf)
             for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]
             if jax.tree_util.keystr(path).endswith("['kernel']")]
  assert len(kernels) >= 3
  for path, kernel in kernels:  # every layer with weights gets some gradient
    assert np.abs(kernel).max() > 0, path
