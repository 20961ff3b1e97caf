"""Layer semantics against PyTorch (the oracle for convolution arithmetic) and layer contracts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnnlab import layers, platforms

torch = pytest.importorskip('torch')
F = torch.nn.functional


def nchw(x):
  return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2))


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope='module')
def images():
  return np.random.RandomState(0).randn(2, 10, 11, 4).astype(np.float32)


@pytest.mark.parametrize('kwargs,torch_kwargs', [
    (dict(kernel_size=3, padding=1), dict(padding=1)),
    (dict(kernel_size=3, strides=2, padding='VALID'), dict(stride=2)),
    (dict(kernel_size=5, padding='SAME'), dict(padding='same')),
    (dict(kernel_size=3, padding='FULL'), dict(padding=2)),
    (dict(kernel_size=(3, 1), padding=(1, 0)), dict(padding=(1, 0))),
    (dict(kernel_size=3, dilation=2, padding=2), dict(dilation=2, padding=2)),
    (dict(kernel_size=3, groups=2, padding=1), dict(groups=2, padding=1)),
    (dict(kernel_size=3, groups=4, padding=1, features=4), dict(groups=4, padding=1)),  # depthwise
])
def test_conv_matches_torch(images, kwargs, torch_kwargs):
  kwargs = {'features': 6, **kwargs}
  block = layers.ConvBlock(norm='none', act='none', **kwargs)
  variables = block.init(jax.random.key(0), images)
  kernel = np.asarray(variables['params']['conv']['kernel'])  # (kh, kw, in/groups, out)
  bias = np.asarray(variables['params']['conv']['bias'])
  expected = F.conv2d(nchw(images), torch.tensor(kernel.transpose(3, 2, 0, 1)), torch.tensor(bias),
                      **torch_kwargs)
  np.testing.assert_allclose(block.apply(variables, images), nhwc(expected), atol=1e-5)


def test_asymmetric_padding_pairs(images):
  block = layers.ConvBlock(3, 3, padding=((0, 2), (1, 0)), norm='none', act='none')
  variables = block.init(jax.random.key(0), images)
  kernel = np.asarray(variables['params']['conv']['kernel']).transpose(3, 2, 0, 1)
  padded = F.pad(nchw(images), (1, 0, 0, 2))  # (w_lo, w_hi, h_lo, h_hi)
  expected = F.conv2d(padded, torch.tensor(kernel), torch.tensor(np.asarray(variables['params']['conv']['bias'])))
  np.testing.assert_allclose(block.apply(variables, images), nhwc(expected), atol=1e-5)


@pytest.mark.parametrize('kind', ['max', 'avg'])
@pytest.mark.parametrize('count_include_pad', [True, False])
@pytest.mark.parametrize('ceil_mode', [False, True])
@pytest.mark.parametrize('window,stride,padding', [(3, 2, 1), (2, 2, 0), (3, 3, 1), (2, 1, 1)])
def test_pool_matches_torch(images, kind, count_include_pad, ceil_mode, window, stride, padding):
  pool = layers.Pool(kind, window, stride, padding=padding, count_include_pad=count_include_pad,
                     ceil_mode=ceil_mode)
  if kind == 'max':
    expected = F.max_pool2d(nchw(images), window, stride, padding, ceil_mode=ceil_mode)
  else:
    expected = F.avg_pool2d(nchw(images), window, stride, padding, ceil_mode=ceil_mode,
                            count_include_pad=count_include_pad)
  np.testing.assert_allclose(pool.apply({}, images), nhwc(expected), atol=1e-6)


@pytest.mark.parametrize('ceil_mode', [False, True])
@pytest.mark.parametrize('window,stride,padding', [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_max_pool_gradient_matches_torch(images, ceil_mode, window, stride, padding):
  """The gradient routes each output's cotangent to its window's maximum (distinct values, so no
  ties), overlapping windows adding up, as PyTorch's max_pool2d backward does."""
  pool = layers.Pool('max', window, stride, padding=padding, ceil_mode=ceil_mode)
  weights = np.random.RandomState(1).randn(*pool.apply({}, images).shape).astype(np.float32)
  grad = jax.grad(lambda x: jnp.sum(pool.apply({}, x) * weights))(jnp.asarray(images))
  x = nchw(images).requires_grad_(True)
  out = F.max_pool2d(x, window, stride, padding, ceil_mode=ceil_mode)
  (out * nchw(weights)).sum().backward()
  np.testing.assert_allclose(grad, nhwc(x.grad), atol=1e-6)


@pytest.mark.parametrize('window,stride,padding', [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_max_pool_gradient_with_ties_goes_to_the_first_maximum_as_in_torch(window, stride, padding):
  """Few distinct values, so windows tie: each output's gradient goes to the first maximal cell in
  row-major order, as PyTorch's; in bfloat16 too."""
  x = np.random.RandomState(2).randint(0, 3, (2, 9, 9, 3)).astype(np.float32)
  pool = layers.Pool('max', window, stride, padding=padding)
  weights = np.random.RandomState(3).randn(*pool.apply({}, x).shape).astype(np.float32)
  t = nchw(x).requires_grad_(True)
  (F.max_pool2d(t, window, stride, padding) * nchw(weights)).sum().backward()
  for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):
    grad = jax.grad(lambda v: jnp.sum(pool.apply({}, v).astype(jnp.float32) * weights))(
        jnp.asarray(x, dtype))
    assert grad.dtype == dtype
    np.testing.assert_allclose(np.asarray(grad, np.float32), nhwc(t.grad), atol=tol, rtol=tol)


@pytest.mark.parametrize('out', [1, 3, (4, 6), 7])
def test_adaptive_avg_pool_matches_torch(images, out):
  np.testing.assert_allclose(layers.AdaptiveAvgPool(out).apply({}, images),
                             nhwc(F.adaptive_avg_pool2d(nchw(images), out)), atol=1e-6)


def test_global_pools(images):
  np.testing.assert_allclose(layers.GlobalPool('avg').apply({}, images), images.mean((1, 2)), atol=1e-6)
  np.testing.assert_allclose(layers.GlobalPool('max').apply({}, images), images.max((1, 2)))


def test_up_block_matches_torch_conv_transpose(images):
  up = layers.UpBlock(5, kernel_size=3, strides=2, padding=1, output_padding=1, norm='none', act='none')
  variables = up.init(jax.random.key(0), images)
  kernel = np.asarray(variables['params']['conv']['kernel'])  # (kh, kw, out, in): transpose_kernel
  # PyTorch's ConvTranspose2d weight is (in, out, kh, kw) and is the adjoint of conv2d.
  weight = torch.tensor(kernel.transpose(3, 2, 0, 1))
  expected = F.conv_transpose2d(nchw(images), weight, torch.tensor(np.asarray(variables['params']['conv']['bias'])),
                                stride=2, padding=1, output_padding=1)
  np.testing.assert_allclose(up.apply(variables, images), nhwc(expected), atol=1e-5)


def test_textbook_exercise_ten_3x3_filters_on_6x6x3():
  block = layers.ConvBlock(10, 3, padding='VALID', norm='none')
  out, variables = jax.jit(block.init_with_output)(jax.random.key(0), jnp.zeros((1, 6, 6, 3)))
  assert out.shape == (1, 4, 4, 10)
  assert sum(p.size for p in jax.tree.leaves(variables['params'])) == 280  # 10 x (27 + 1)


def test_batch_norm_train_and_eval():
  block = layers.ConvBlock(4, 3)
  x = jax.random.normal(jax.random.key(1), (8, 6, 6, 3)) * 3 + 2
  variables = jax.jit(block.init)(jax.random.key(0), x)
  y, updates = block.apply(variables, x, train=True, mutable=['batch_stats'])
  assert not np.allclose(updates['batch_stats']['norm']['mean'], 0)  # running stats moved
  assert y.shape == (8, 6, 6, 4) and float(y.min()) >= 0  # ReLU after the norm


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('train', [True, False])
def test_batch_norm_is_flax_batch_norm(dtype, train):
  """Same variables, outputs, running statistics and gradients as flax.linen.BatchNorm."""
  import flax.linen as nn
  x = (jax.random.normal(jax.random.key(0), (4, 5, 6, 8)) * 3 + 1).astype(dtype)
  cotangent = jax.random.normal(jax.random.key(2), x.shape).astype(dtype)
  variables = {'params': {'scale': jnp.linspace(0.5, 1.5, 8), 'bias': jnp.linspace(-1, 1, 8)},
               'batch_stats': {'mean': jnp.linspace(0, 1, 8), 'var': jnp.linspace(1, 2, 8)}}

  def loss(module, variables, x):
    with jax.numpy_dtype_promotion('standard'):  # Flax promotes a bfloat16 input to its stats
      y, updates = module.apply(variables, x, mutable=['batch_stats'])
    return jnp.sum(y.astype(jnp.float32) * cotangent.astype(jnp.float32)), (y, updates)

  out = {}
  for name, module in (('flax', nn.BatchNorm(not train, momentum=0.9, dtype=dtype)),
                       ('cnnlab', layers.BatchNorm(not train, momentum=0.9, dtype=dtype))):
    with jax.numpy_dtype_promotion('standard'):
      init = module.init(jax.random.key(1), x)
    (_, (y, updates)), grads = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(
        module, variables, x)
    out[name] = (jax.tree.structure(init), y, updates, grads)
  assert out['flax'][0] == out['cnnlab'][0]
  assert out['cnnlab'][1].dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for a, b in zip(jax.tree.leaves(out['flax'][1:]), jax.tree.leaves(out['cnnlab'][1:])):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol,
                               atol=tol)


def test_batch_norm_gradient_matches_torch():
  """The hand-written gradient of batch_norm_train against PyTorch's autograd, training mode."""
  x = np.random.RandomState(3).randn(6, 5, 4, 7).astype(np.float32) * 2 + 0.5
  scale, bias = np.linspace(0.5, 2, 7, dtype=np.float32), np.linspace(-1, 1, 7, dtype=np.float32)
  cotangent = np.random.RandomState(4).randn(*x.shape).astype(np.float32)
  f = lambda x, s, b: jnp.sum(layers.batch_norm_train(x, s, b, 1e-5, None, jnp.float32)[0]
                              * cotangent)
  grads = jax.grad(f, argnums=(0, 1, 2))(x, scale, bias)
  tx = nchw(x).requires_grad_()
  ts, tb = (torch.tensor(v, requires_grad=True) for v in (scale, bias))
  y = F.batch_norm(tx, None, None, ts, tb, training=True, eps=1e-5)
  (y * nchw(cotangent)).sum().backward()
  np.testing.assert_allclose(grads[0], nhwc(tx.grad), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grads[1], ts.grad.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grads[2], tb.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_cross_replica_batch_norm_equals_one_device_on_the_whole_batch():
  """Under pmap the statistics and the input's gradient span the replicas; parameter gradients
  are each replica's own (the train step averages them)."""
  n = 4
  x = np.random.RandomState(5).randn(n * 3, 4, 4, 6).astype(np.float32) + 1
  cotangent = np.random.RandomState(6).randn(*x.shape).astype(np.float32)
  scale, bias = np.linspace(0.5, 2, 6, dtype=np.float32), np.zeros(6, np.float32)

  def loss(x, s, b, ct, axis_name):
    y, mean, var = layers.batch_norm_train(x, s, b, 1e-5, axis_name, jnp.float32)
    return jnp.sum(y * ct), (y, mean, var)

  (_, whole), whole_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
      x, scale, bias, cotangent, None)
  shard = lambda a: a.reshape(n, -1, *a.shape[1:])
  (_, split), split_grads = jax.pmap(
      jax.value_and_grad(lambda *a: loss(*a, 'r'), argnums=(0, 1, 2), has_aux=True),
      axis_name='r', in_axes=(0, None, None, 0), devices=jax.devices()[:n])(
          shard(x), scale, bias, shard(cotangent))
  np.testing.assert_allclose(split[0].reshape(x.shape), whole[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(split[1][0], whole[1], rtol=1e-5, atol=1e-6)  # one mean everywhere
  np.testing.assert_allclose(split[2][0], whole[2], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(split_grads[0].reshape(x.shape), whole_grads[0], rtol=1e-4, atol=1e-5)
  for i in (1, 2):  # the replicas' parameter gradients add up to the whole batch's
    np.testing.assert_allclose(split_grads[i].sum(0), whole_grads[i], rtol=1e-4, atol=1e-4)


def test_channel_sum_on_cpu_and_elsewhere():
  from cnnlab.layers import norm
  x = jax.random.normal(jax.random.key(0), (3, 4, 5, 6), jnp.bfloat16)
  expected = np.asarray(x, np.float64).sum(axis=(0, 1, 2))
  for got in (layers.channel_sum(x), norm._channel_sum_product(x.astype(jnp.float32)),
              norm._channel_sum_reduce(x.astype(jnp.float32))):
    assert got.dtype == jnp.float32 and got.shape == (6,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_channel_sum_stays_accurate_on_long_sums():
  """A single product of 401,408 rows with a ones vector lost 2e-5 of the sum in float32, which a
  cancelling gradient sum (batch norm's bias) turns into percents; partial sums keep ~2e-7."""
  x = jax.random.normal(jax.random.key(1), (32, 112, 112, 8), jnp.float32) + 3.0
  exact = np.asarray(x, np.float64).sum(axis=(0, 1, 2))
  relative = np.abs(np.asarray(layers.channel_sum(x), np.float64) - exact) / np.abs(exact)
  assert relative.max() < 1e-6


def test_cpu_formulations_equal_xla_own_values_and_gradients():
  """Each layer's CPU formulation (written-out gradient) against what other platforms run."""
  from cnnlab.layers import norm, pool
  key = jax.random.key(2)
  x = jax.random.normal(key, (8, 14, 14, 16)) * 2.0 + 1.0
  scale, bias = jax.random.normal(key, (16,)), jax.random.normal(jax.random.key(3), (16,))
  weights = jax.random.normal(jax.random.key(4), x.shape)
  cpu = lambda x, s, b: norm._batch_norm_vjp(x, s, b, 1e-5, None, jnp.float32)
  xla = lambda x, s, b: norm._bn_fwd(x, s, b, 1e-5, None, jnp.float32)[0]
  loss = lambda f: lambda *a: jnp.sum(f(*a)[0] * weights) + jnp.sum(f(*a)[1]) + jnp.sum(f(*a)[2])
  for a, b in zip(jax.grad(loss(cpu), (0, 1, 2))(x, scale, bias),
                  jax.grad(loss(xla), (0, 1, 2))(x, scale, bias)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  args = ((3, 3), (2, 2), ((1, 1), (1, 1)), (7, 7))
  ties = jnp.round(x)  # many tied maxima: both send a window's gradient to its first maximum
  for inputs in (x, ties):
    cpu_pool = lambda x: pool._max_pool(x, *args)
    xla_pool = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                           ((0, 0), (1, 1), (1, 1), (0, 0)))
    np.testing.assert_array_equal(cpu_pool(inputs), xla_pool(inputs))
    ct = weights[:, :7, :7]
    got = jax.grad(lambda x: jnp.sum(cpu_pool(x) * ct))(inputs)
    want = jax.grad(lambda x: jnp.sum(xla_pool(x) * ct))(inputs)
    np.testing.assert_array_equal(got != 0, want != 0)  # the same cells, overlaps summed
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def conv_norm_pool_loss():
  """(loss(params), params) of a conv-norm-pool block's output in training."""
  block = layers.ConvBlock(8)
  pooling = layers.Pool('max', 2)
  x = jnp.ones((4, 8, 8, 3))
  variables = block.init(jax.random.key(0), x)

  def loss(params):
    y, _ = block.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return jnp.sum(pooling.apply({}, y) ** 2)
  return loss, variables['params']


@pytest.mark.parametrize('platform,written', [('cpu', True), ('cuda', False)])
def test_each_platform_compiles_its_own_formulation(platform, written):
  """Lowered for CPU, a conv-norm-pool gradient holds only the written-out formulations (products
  with ones, no select-and-scatter); lowered for a GPU, only XLA's own."""
  loss, params = conv_norm_pool_loss()
  text = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=(platform,)).as_text()
  assert ('select_and_scatter' not in text) == written
  assert ('dot_general' in text) == written


@pytest.mark.parametrize('platform,written', [('cpu', True), ('gpu', False)])
def test_traced_for_a_platform_traces_its_formulation_alone(platform, written):
  """Traced for a known platform (as cnnlab.parallel traces the train and evaluation steps), the
  gradient holds that platform's formulation and no conditional over platforms, and on CPU gives
  the values of the untraced choice."""
  loss, params = conv_norm_pool_loss()
  grad = platforms.traced_for(platform, jax.grad(loss))
  jaxpr = str(jax.make_jaxpr(grad)(params))
  assert 'cond[' not in jaxpr and 'platform_index' not in jaxpr
  assert ('select_and_scatter' not in jaxpr) == written
  assert ('dot_general' in jaxpr) == written
  assert 'cond[' in str(jax.make_jaxpr(jax.grad(loss))(params))  # untraced: both, chosen later
  if platform == 'cpu':
    for a, b in zip(jax.tree.leaves(jax.jit(grad)(params)),
                    jax.tree.leaves(jax.jit(jax.grad(loss))(params))):
      np.testing.assert_array_equal(a, b)


NHWC = ('NHWC', 'HWIO', 'NHWC')

# (input H, W; kernel; stride; dilation) of 'SAME' convolutions whose operands, or whose
# gradient's, XLA swaps: 2x2, 1x1 and 2x3 maps under 3x3 and 5x5 kernels, 3x3/2 from 2x2 and from
# 4x4 (only its input gradient is swapped), a dilated 3x3 whose centre tap alone reaches a 2x2 map.
SWAPPED_CONVS = [((2, 2), 3, 1, 1), ((1, 1), 3, 1, 1), ((1, 1), 5, 1, 1), ((2, 3), 5, 1, 1),
                 ((2, 2), 3, 2, 1), ((4, 4), 3, 2, 1), ((2, 2), 3, 1, 2)]


@pytest.mark.parametrize('size,kernel,stride,dilation', SWAPPED_CONVS)
def test_small_map_conv_formulation_equals_xla_values_and_gradients(size, kernel, stride,
                                                                     dilation):
  """Traced for CPU, a convolution XLA would swap is a patches product, with no convolution left,
  that has the convolution's values and input and kernel gradients (bfloat16: within rounding)."""
  from cnnlab.layers import conv
  args = dict(window_strides=(stride, stride), padding='SAME', rhs_dilation=(dilation, dilation),
              dimension_numbers=NHWC)
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
    x = jax.random.normal(jax.random.key(0), (2, *size, 8)).astype(dtype)
    w = (0.3 * jax.random.normal(jax.random.key(1), (kernel, kernel, 8, 16))).astype(dtype)
    xla = lambda x, w: lax.conv_general_dilated(x, w, **args)
    ct = jax.random.normal(jax.random.key(2), jax.eval_shape(xla, x, w).shape)

    def value_and_grads(f):
      loss = lambda x, w: (lambda y: (jnp.sum(y.astype(jnp.float32) * ct), y))(f(x, w))
      (_, y), (dx, dw) = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, w)
      return y, dx, dw

    cpu = platforms.traced_for(
        'cpu', lambda x, w: value_and_grads(lambda x, w: conv.conv_general_dilated(x, w, **args)))
    assert 'conv_general_dilated' not in str(jax.make_jaxpr(cpu)(x, w))
    got, want = jax.jit(lambda x, w: (cpu(x, w), value_and_grads(xla)))(x, w)
    for a, b in zip(got, want):
      assert a.dtype == dtype
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol,
                                 atol=tol)


@pytest.mark.parametrize('size,kwargs,patches', [
    ((2, 2), {}, True), ((1, 1), {}, True),
    ((4, 4), dict(strides=2), True),  # its input gradient is swapped
    ((3, 3), {}, False), ((8, 8), dict(strides=2), False), ((2, 2), dict(kernel_size=1), False),
    ((1, 1), dict(padding='FULL'), False),  # a 1x1 map padded by kernel - 1: XLA keeps it
    ((2, 2), dict(groups=2), False),  # XLA swaps no grouped convolution
])
def test_conv_block_takes_the_patches_product_only_where_xla_swaps(size, kwargs, patches):
  """ConvBlock's gradient traced for CPU holds no convolution where XLA would swap one (of the
  forward pass or of its gradient) and only there; traced for another platform it keeps XLA's
  convolution, and untraced it defers the choice (a conditional) only where there is one."""
  block = layers.ConvBlock(8, **{'kernel_size': 3, 'norm': 'none', 'act': 'none', **kwargs})
  x = jnp.ones((2, *size, 4))
  variables = block.init(jax.random.key(0), x)
  grad = jax.grad(lambda v, x: jnp.sum(block.apply(v, x) ** 2), (0, 1))
  for platform in ('cpu', 'gpu'):
    jaxpr = str(jax.make_jaxpr(platforms.traced_for(platform, grad))(variables, x))
    assert 'cond[' not in jaxpr
    assert ('conv_general_dilated' not in jaxpr) == (patches and platform == 'cpu')
  assert ('cond[' in str(jax.make_jaxpr(grad)(variables, x))) == patches


def test_xla_swaps_the_convolutions_predicted():
  """conv.xla_swaps_operands restates XLA's ConvOperandSwapper: the compiled value and gradient
  of a convolution hold a swapped convolution (its window reversed) for each of the forward,
  input-gradient and kernel-gradient convolutions predicted, and no other. If an XLA upgrade
  moves the rule, this fails and the CPU formulation's condition must follow it."""
  from cnnlab.layers import conv
  for size, kernel, stride, padding in [((2, 2), 3, 1, 'SAME'), ((1, 1), 3, 1, 'SAME'),
                                        ((1, 1), 3, 1, ((2, 2), (2, 2))), ((3, 3), 3, 1, 'SAME'),
                                        ((4, 4), 3, 2, 'SAME'), ((8, 8), 3, 2, 'SAME'),
                                        ((2, 2), 5, 1, 'SAME'), ((2, 3), 3, 1, 'SAME')]:
    x, w = jnp.ones((2, *size, 4)), jnp.ones((kernel, kernel, 4, 8))
    f = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), padding,
                                              dimension_numbers=NHWC)
    hlo = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(f(x, w) ** 2), (0, 1))).lower(
        x, w).compile().as_text()
    swapped = [line for line in hlo.splitlines()
               if ' convolution(' in line and 'rhs_reversal' in line]
    pads = (lax.padtype_to_pads(size, (kernel, kernel), (stride, stride), padding)
            if isinstance(padding, str) else padding)
    out = jax.eval_shape(f, x, w).shape[1:3]
    predicted = [conv.xla_swaps_operands(*args) for args in conv.gradient_convolutions(
        size, (kernel, kernel), (stride, stride), pads, (1, 1), out).values()]
    assert len(swapped) == sum(predicted), (size, kernel, stride, padding, swapped, predicted)


def test_residual_relu_has_relu_values_and_gradients_ties_included():
  y = jnp.array([-2.0, -1.0, 0.0, 0.0, 1.0, 0.5, -0.5])
  shortcut = jnp.array([1.0, 1.0, 0.0, 2.0, -1.0, 0.0, 3.0])  # sums: -1, 0, 0, 2, 0, 0.5, 2.5
  reference = lambda y, s: jax.nn.relu(y + s)
  for act in ('relu', jax.nn.relu):
    fn = lambda y, s: layers.residual_activation(y, s, act)
    np.testing.assert_array_equal(fn(y, shortcut), reference(y, shortcut))
    for argnum in (0, 1):
      np.testing.assert_array_equal(jax.grad(lambda *a: jnp.sum(fn(*a)), argnum)(y, shortcut),
                                    jax.grad(lambda *a: jnp.sum(reference(*a)), argnum)(y, shortcut))
  np.testing.assert_allclose(layers.residual_activation(y, shortcut, 'gelu'),
                             jax.nn.gelu(y + shortcut), rtol=1e-6)
  np.testing.assert_array_equal(layers.residual_activation(y, shortcut, 'none'), y + shortcut)


def test_group_and_layer_norm_choose_valid_groups():
  for norm in ('group', 'layer'):
    y, v = jax.jit(layers.ConvBlock(12, 3, norm=norm, num_groups=8).init_with_output)(
        jax.random.key(0), jnp.ones((2, 5, 5, 3)))
    assert y.shape == (2, 5, 5, 12) and 'norm' in v['params']


@pytest.mark.parametrize('shortcut', ['projection', 'pad'])
def test_basic_block_shapes_and_shortcut(shortcut):
  block = layers.BasicBlock(16, strides=2, shortcut=shortcut)
  y, v = jax.jit(block.init_with_output)(jax.random.key(0), jnp.ones((2, 8, 8, 8)))
  assert y.shape == (2, 4, 4, 16)
  assert ('shortcut' in v['params']) == (shortcut == 'projection')


def test_zero_init_last_makes_the_block_start_as_identity():
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 6, 6, 16)))
  for block in (layers.BasicBlock(16, zero_init_last=True), layers.Bottleneck(4, zero_init_last=True)):
    v = jax.jit(block.init)(jax.random.key(1), x)
    np.testing.assert_allclose(block.apply(v, x), x, atol=1e-6)  # relu(0 + x) = x for x >= 0


def test_bottleneck_expands_by_four_and_strides_the_3x3():
  block = layers.Bottleneck(8, strides=2)
  y, v = jax.jit(block.init_with_output)(jax.random.key(0), jnp.ones((1, 8, 8, 16)))
  assert y.shape == (1, 4, 4, 32)
  assert v['params']['conv2']['conv']['kernel'].shape == (3, 3, 8, 8)
  assert v['params']['conv1']['conv']['kernel'].shape == (1, 1, 16, 8)


def test_inception_block_concatenates_four_branches():
  block = layers.InceptionBlock(8, 4, 12, 2, 6, 5)
  y, v = jax.jit(block.init_with_output)(jax.random.key(0), jnp.ones((1, 7, 7, 10)))
  assert y.shape == (1, 7, 7, 8 + 12 + 6 + 5)
  assert v['params']['branch3']['conv']['kernel'].shape[:2] == (5, 5)
  assert set(v['params']) == {'branch1', 'branch2_reduce', 'branch2', 'branch3_reduce', 'branch3', 'branch4_proj'}


def test_aux_head_output():
  y = jax.jit(layers.AuxHead(7).init_with_output)(jax.random.key(0), jnp.ones((2, 14, 14, 32)))[0]
  assert y.shape == (2, 7)


@pytest.mark.parametrize('make,argument', [
    (lambda: layers.ConvBlock(8, kernel_size=0), 'kernel_size'),
    (lambda: layers.ConvBlock(8, strides=-1), 'strides'),
    (lambda: layers.ConvBlock(8, padding='HALF'), 'padding'),
    (lambda: layers.ConvBlock(8, norm='instance'), 'norm'),
    (lambda: layers.ConvBlock(8, act='relu7'), 'act'),
    (lambda: layers.ConvBlock(6, groups=4), 'groups'),
    (lambda: layers.Pool('median'), 'pool'),
    (lambda: layers.Pool('max', window=0), 'window'),
    (lambda: layers.make_pool('sum'), 'pool'),
    (lambda: layers.BasicBlock(8, shortcut='skip'), 'shortcut'),
    (lambda: layers.UpBlock(8, kernel_size=0), 'kernel_size'),
])
def test_invalid_arguments_name_the_argument(make, argument):
  with pytest.raises(ValueError, match=argument):
    make()


def test_too_small_input_names_the_layer():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = layers.ConvBlock(4, 3, 2, padding=0, name='stage1_conv')(x)
      return layers.ConvBlock(4, 5, padding='VALID', name='stage2_conv')(x)

  with pytest.raises(ValueError, match='stage2_conv.*too small'):
    Net().init(jax.random.key(0), jnp.ones((1, 7, 7, 1)))


def test_make_pool_none_is_no_layer():
  assert layers.make_pool('none') is None
  assert isinstance(layers.make_pool('avg', 3, 2), layers.Pool)
