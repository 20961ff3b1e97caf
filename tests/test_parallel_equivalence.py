"""Data parallelism computes one device's step: one training step of real configurations on 2 and 4
devices, under jit over a mesh and under pmap, against the same step on one device.

The configurations are the ones where a wrong gradient shows: 28x28 inputs with batch norm and max
pooling (the quickstart's own model), average pooling, a ResNet. Every shipped experiment is run
end to end on 4 devices in tests/test_experiments.py, a representative few against one. The
step is the real one (augmentation, batch norm over the global batch, the optimizer), from
`bench/parallel_equivalence.py`, which also measures the distance of each result to float64.

The bounds: the loss to 1e-5 and the gradient norm to 1e-4 (relative), every parameter tensor to
1e-2 of its largest value. Rounding leaves about 1e-6 of most tensors, and up to a few 1e-3 of
batch-norm biases whose gradients are sums that nearly cancel (as far from float64 on one device
as on several; bench/README.md). The wrong max-pool gradient this guards against moved the
quickstart's gradient norm by 5e-3 and a bias by 38%.

Adam's first update is lr * g / (|g| + eps), about lr * sign(g): it turns the rounding noise of a
gradient entry that is nearly zero into a full-size update of either sign. The experiments that
train with Adam are compared with SGD, which is linear in the gradient.
"""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'bench'))

import parallel_equivalence as equivalence  # noqa: E402  (imports no backend at module level)

GRAD_NORM_RTOL = 1e-4
PARAM_TOL = 1e-2  # of each tensor's largest value


@pytest.fixture(scope='module')
def data_dir(shared_data_dir):
  return shared_data_dir


def step(case, data_dir, strategy='jit', devices=1, extra=()):
  experiment, overrides = equivalence.CASES[case]
  return equivalence.one_step(equivalence.load_config(
      experiment, [*overrides, *extra, f"data.data_dir='{data_dir}'"], strategy=strategy,
      devices=devices))


def assert_same_step(one, many):
  (state1, metrics1), (state_n, metrics_n) = one, many
  assert metrics_n['loss'] == pytest.approx(metrics1['loss'], rel=1e-5)
  assert metrics_n['grad_norm'] == pytest.approx(metrics1['grad_norm'], rel=GRAD_NORM_RTOL)
  for tree in ('params', 'batch_stats'):
    worst, path = equivalence.worst_difference(getattr(state_n, tree), getattr(state1, tree))
    assert worst < PARAM_TOL, f'{tree} {path}: {worst:.2e} of its largest value'


QUICKSTART_28 = ['train.batch_size=32']


@pytest.mark.parametrize('pool,layouts', [  # between them: 2 and 4 devices, jit and pmap
    ('max', (('jit', 2), ('pmap', 4))),
    ('avg', (('jit', 4), ('pmap', 2)))])
def test_quickstart_model_on_28x28(pool, layouts, data_dir):
  extra = [*QUICKSTART_28, f"model.pool=('none', '{pool}', '{pool}')"]
  one = step('quickstart', data_dir, extra=extra)
  for strategy, devices in layouts:
    assert_same_step(one, step('quickstart', data_dir, strategy, devices, extra))


def test_resnet_with_batch_norm(data_dir):
  extra = ['train.batch_size=16', 'data.shapes.num_train=64', 'data.shapes.num_test=32']
  one = step('resnet20_shapes', data_dir, extra=extra)
  # (pmap on 4 devices: tests/test_experiments.py compares cifar10_resnet18 so.)
  assert_same_step(one, step('resnet20_shapes', data_dir, 'jit', 2, extra))


def test_worst_difference_names_the_tensor():
  a = {'conv': {'kernel': np.array([1.0, -4.0])}, 'head': {'bias': np.array([0.5, 0.5])}}
  b = {'conv': {'kernel': np.array([1.0, -4.0])}, 'head': {'bias': np.array([0.5, 1.0])}}
  assert equivalence.worst_difference(a, b) == (0.5, 'head/bias')


def test_the_float64_reference_is_the_same_step(data_dir):
  """The benchmark's float64 step is the float32 step in wider arithmetic: on 8x8 digits, where
  nothing cancels, the two agree to float32 rounding."""
  one = step('quickstart_digits', data_dir, extra=['train.batch_size=32'])
  experiment, overrides = equivalence.CASES['quickstart_digits']
  wide, grad_norm = equivalence.float64_step(equivalence.load_config(
      experiment, [*overrides, 'train.batch_size=32', f"data.data_dir='{data_dir}'"]))
  assert grad_norm == pytest.approx(one[1]['grad_norm'], rel=1e-5)
  worst, path = equivalence.worst_difference(one[0].params, wide)
  assert worst < 1e-4, f'{path}: {worst:.2e}'
