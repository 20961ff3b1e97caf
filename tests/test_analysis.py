"""Receptive fields (analytic vs gradient-measured), MACs and the summary table."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab import analysis, cli, layers, models


class Stack(nn.Module):
  """Convolutions and average pools (whose gradients reach every cell of their window)."""
  spec: tuple  # ('conv', kernel, stride, dilation, padding) | ('pool', window, stride, padding)

  @nn.compact
  def __call__(self, x, train=False):
    for i, (kind, *args) in enumerate(self.spec):
      if kind == 'conv':
        k, s, d, p = args
        x = layers.ConvBlock(2, k, s, padding=p, dilation=d, norm='none', act='none',
                             kernel_init=nn.initializers.ones, name=f'l{i}')(x)
      else:
        w, s, p = args
        x = layers.Pool('avg', w, s, padding=p, name=f'l{i}')(x)
    return x


def measured_field(model, size, cell):
  """Extent (rows, cols) and centre of the input region that influences output cell `cell`."""
  x = jnp.ones((1, size, size, 1))
  variables = model.init(jax.random.key(0), x)
  grad = jax.grad(lambda x: model.apply(variables, x)[0, cell[0], cell[1], 0])(x)[0, :, :, 0]
  rows, cols = np.nonzero(np.asarray(grad))
  return ((rows.max() - rows.min() + 1, cols.max() - cols.min() + 1),
          ((rows.max() + rows.min()) / 2, (cols.max() + cols.min()) / 2))


@pytest.mark.parametrize('spec', [
    (('conv', 3, 1, 1, 0),) * 4,                                   # textbook L(K-1)+1 = 9
    (('conv', 5, 1, 1, 2), ('conv', 5, 1, 1, 2)),                  # = 9 as well
    (('conv', 3, 2, 1, 1), ('conv', 3, 1, 1, 1), ('pool', 2, 2, 0), ('conv', 3, 1, 1, 1)),
    (('conv', 3, 1, 2, 'SAME'), ('conv', 3, 1, 4, 'SAME')),          # dilated
    (('conv', 7, 2, 1, 3), ('pool', 3, 2, 1), ('conv', 3, 1, 1, 1)),  # a ResNet-like stem
])
def test_receptive_field_matches_gradient_measurement(spec):
  model = Stack(spec)
  size = 64
  last = analysis.receptive_field(model, (size, size, 1))[-1]
  # The output cell nearest the input's centre, whose field the border cannot clip.
  cell = tuple(int(round((size - 1) / 2 - s) // j) for s, j in zip(last.start, last.jump))
  extent, centre = measured_field(model, size, cell)
  assert extent == last.size
  assert centre == tuple(s + c * j for s, c, j in zip(last.start, cell, last.jump))


def test_textbook_receptive_field():
  for n_layers, k in [(1, 3), (3, 3), (5, 3), (2, 5)]:
    model = Stack((('conv', k, 1, 1, 'SAME'),) * n_layers)
    assert analysis.receptive_field(model, (32, 32, 1))[-1].size == (n_layers * (k - 1) + 1,) * 2


def test_known_network_receptive_fields():
  # ResNet-18 at 224: 435 px, jump 32; VGG-16's last pool: 212 px.
  assert analysis.receptive_field(models.create_model('resnet18'), (224, 224, 3))[-1].size == (435, 435)
  vgg = [r for r in analysis.receptive_field(models.create_model('vgg16'), (224, 224, 3))
         if r.name == 'stage5_pool'][0]
  assert (vgg.size, vgg.jump) == ((212, 212), (32, 32))


def test_inception_merges_its_branches():
  # The last record is the merged field of all branches, not the last branch's.
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = layers.ConvBlock(4, 3, name='c')(x)
      return layers.InceptionBlock(2, 2, 2, 2, 2, 2, branch3_kernel=7, name='inc')(x)
  records = analysis.receptive_field(Net(), (16, 16, 3))
  assert records[-1].name == 'inc' and records[-1].size == (9, 9)  # 3 + (7 - 1)


def test_summary_params_and_macs():
  summary = analysis.summarize(models.create_model('simple_cnn'), (32, 32, 3))
  rows = {r.name: r for r in summary.layers}
  assert summary.total_params == 10_002
  assert rows['conv1'].macs == 28 * 28 * 5 * (5 * 5 * 3)
  assert rows['conv2'].output_shape == (10, 10, 10)
  assert rows['fc1'].macs == 250 * 32
  assert summary.total_macs == sum(r.macs for r in summary.layers)
  assert summary.receptive_field == (16, 16)
  # ResNet-18 at 224: 1.814 GMACs, the figure usually quoted as 1.8 GFLOPs.
  assert analysis.summarize(models.create_model('resnet18'), (224, 224, 3)).total_macs == 1_814_073_344


def test_depthwise_macs_divide_by_groups():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return layers.ConvBlock(8, 3, groups=8, norm='none', name='dw')(x)
  (row,) = analysis.summarize(Net(), (10, 10, 8)).layers
  assert row.macs == 10 * 10 * 8 * 9


def test_cli_summary(capsys):
  assert cli.main(['summary', '--model', 'resnet18', '--input-shape', '32,32,3', '--num-classes', '10']) == 0
  out = capsys.readouterr().out
  assert 'stage4_block2/conv2' in out and 'total params: 11,181,642' in out
  assert cli.main(['summary', '--model', 'conv_stack', '--set', 'filters=[4,8]', '--json']) == 0
  data = json.loads(capsys.readouterr().out)
  assert data['total_params'] == analysis.count_params(models.create_model('conv_stack', filters=(4, 8)), (28, 28, 1))
  assert cli.main(['summary', '--model', 'resnet']) == 2
  assert 'Available models' in capsys.readouterr().err
