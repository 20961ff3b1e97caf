"""Output-size arithmetic: the textbook formulas, PyTorch's semantics, and the layers themselves."""

import itertools

import jax
import jax.numpy as jnp
import pytest

from cnnlab import geometry, layers
from cnnlab.analysis import conv_output_size, pool_output_size, conv_transpose_output_size

torch = pytest.importorskip('torch')


def test_textbook_formula():
  # floor((n + 2p - d(k-1) - 1)/s) + 1
  assert conv_output_size(6, 3) == 4                    # the seeds' 6x6 input, 3x3 filter
  assert conv_output_size(32, 5, 1, 2) == 32            # "same" by padding (k-1)/2
  assert conv_output_size(224, 11, 4, 2) == 55          # AlexNet conv1
  assert conv_output_size(224, 7, 2, 3) == 112          # ResNet stem
  assert conv_output_size(7, 3, 1, 0, dilation=2) == 3  # dilated 3x3 spans 5 cells
  assert conv_output_size(5, 3, 2, 'SAME') == 3         # ceil(5 / 2)
  assert conv_output_size(5, 3, 1, 'FULL') == 7         # n + k - 1
  assert conv_output_size(5, 3, 1, 'VALID') == 3
  assert conv_output_size(2, 5) < 1                     # the kernel does not fit


@pytest.mark.parametrize('n,k,s,p,d', [(n, k, s, p, d) for n, k, s, p, d in itertools.product(
    (5, 8, 13), (1, 2, 3, 5), (1, 2, 3), (0, 1, 2), (1, 2)) if n + 2 * p >= d * (k - 1) + 1])
def test_conv_size_matches_torch_and_layer(n, k, s, p, d):
  expected = torch.nn.functional.conv2d(torch.zeros(1, 1, n, n), torch.zeros(1, 1, k, k),
                                        stride=s, padding=p, dilation=d).shape[-1]
  assert conv_output_size(n, k, s, p, d) == expected
  layer = layers.ConvBlock(2, k, s, padding=p, dilation=d, norm='none')
  out = jax.eval_shape(lambda x: layer.init_with_output(jax.random.key(0), x)[0],
                       jnp.zeros((1, n, n, 1)))
  assert out.shape[1:3] == (expected, expected)


@pytest.mark.parametrize('n,k,s,p,ceil', [(n, k, s, p, c) for n, k, s, p, c in itertools.product(
    (5, 8, 10, 13), (2, 3), (1, 2, 3), (0, 1), (False, True)) if p <= k // 2])
def test_pool_size_matches_torch_and_layer(n, k, s, p, ceil):
  expected = torch.nn.functional.max_pool2d(torch.zeros(1, 1, n, n), k, s, p, ceil_mode=ceil).shape[-1]
  assert pool_output_size(n, k, s, p, ceil_mode=ceil) == expected
  out = layers.Pool('avg', k, s, padding=p, ceil_mode=ceil).apply({}, jnp.zeros((1, n, n, 1)))
  assert out.shape[1:3] == (expected, expected)


@pytest.mark.parametrize('n,k,s,p,op', [(4, 2, 2, 0, 0), (5, 3, 2, 1, 1), (7, 4, 2, 1, 0),
                                         (3, 3, 1, 1, 0), (6, 5, 3, 2, 2)])
def test_conv_transpose_size_matches_torch_and_layer(n, k, s, p, op):
  expected = torch.nn.functional.conv_transpose2d(
      torch.zeros(1, 1, n, n), torch.zeros(1, 1, k, k), stride=s, padding=p,
      output_padding=op).shape[-1]
  assert conv_transpose_output_size(n, k, s, p, output_padding=op) == expected
  up = layers.UpBlock(3, k, s, padding=p, output_padding=op, norm='none')
  out = jax.eval_shape(lambda x: up.init_with_output(jax.random.key(0), x)[0], jnp.zeros((1, n, n, 2)))
  assert out.shape[1:3] == (expected, expected)


def test_same_padding_puts_the_odd_cell_last():
  assert geometry.resolve_padding('SAME', 3, 2, 1, 6) == (0, 1)
  assert geometry.resolve_padding('SAME', 3, 1, 1, 6) == (1, 1)
  assert geometry.resolve_padding('FULL', 3, 1, 2, 6) == (4, 4)


@pytest.mark.parametrize('bad', ['same-ish', -1, (1, 2, 3), ((1, -1), (0, 0)), True])
def test_bad_padding_is_rejected(bad):
  with pytest.raises(ValueError, match='padding'):
    geometry.check_padding(bad)


def test_field_composition_matches_textbook():
  f = geometry.Field()
  for _ in range(4):
    f = f.then(3)
  assert f.size == geometry.textbook_receptive_field(4, 3) == 9
  g = geometry.Field().then(3, 2).then(3)  # a stride multiplies later growth
  assert (g.size, g.jump) == (7, 2)
