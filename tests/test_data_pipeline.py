"""Device and grain pipelines: position = f(seed, step), identical streams, sharding, evaluation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import cnnlab.data as data
from cnnlab.data import host, pipeline

SHAPES = dict(resolution=16, num_classes=3, num_train=100, num_test=30, dataset_seed=1)
BATCH = 16  # divisible by the test devices (conftest makes 8)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('datasets'))


@pytest.fixture(scope='module')
def shardings():
  mesh = jax.make_mesh((len(jax.devices()),), ('data',))
  return NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))


@pytest.fixture(scope='module')
def device_pipe(data_dir, shardings):
  replicated, batch = shardings
  return data.DevicePipeline.create('shapes', 'train', batch_size=BATCH, seed=0,
                                    sharding_replicated=replicated, sharding_batch=batch,
                                    data_dir=data_dir, **SHAPES)


def grain_pipe(data_dir, shardings, **kw):
  kw = {'batch_size': BATCH, 'seed': 0, **kw}
  return data.GrainPipeline.create('shapes', 'train', sharding_batch=shardings[1],
                                   data_dir=data_dir, **kw, **SHAPES)


def to_np(batch: dict) -> dict:
  return {k: np.asarray(v) for k, v in batch.items()}


def assert_batches_equal(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_device_arrays_and_batch_layout(device_pipe, shardings):
  arrays = device_pipe.arrays
  assert arrays['image'].shape == (100, 16, 16, 3) and arrays['image'].dtype == jnp.uint8
  assert arrays['label'].dtype == jnp.int32 and arrays['mask'].shape == (100, 16, 16)
  assert arrays['bbox'].shape == (100, 4) and device_pipe.steps_per_epoch == 100 // BATCH
  batch = device_pipe.batch(0)
  assert batch['image'].shape == (BATCH, 16, 16, 3) and batch['image'].dtype == jnp.uint8
  for value in batch.values():
    assert value.sharding.is_equivalent_to(shardings[1], value.ndim)
  b = to_np(batch)
  np.testing.assert_array_equal(b['label'], np.asarray(arrays['label'])[b['index']])
  np.testing.assert_array_equal(b['mask'], np.asarray(arrays['mask'])[b['index']])


def test_same_seed_same_batches_other_seed_other_batches(device_pipe, data_dir, shardings):
  again = data.DevicePipeline.create('shapes', 'train', batch_size=BATCH, seed=0,
                                     sharding_replicated=shardings[0],
                                     sharding_batch=shardings[1], data_dir=data_dir, **SHAPES)
  other = dataclasses.replace(device_pipe, seed=1)
  for step in (0, 5, 13):
    assert_batches_equal(device_pipe.batch(step), again.batch(step))
    assert not np.array_equal(to_np(device_pipe.batch(step))['index'],
                              to_np(other.batch(step))['index'])


def test_each_epoch_is_a_permutation_and_epochs_differ(device_pipe):
  spe = device_pipe.steps_per_epoch
  epochs = [np.concatenate([to_np(device_pipe.batch(e * spe + s))['index'] for s in range(spe)])
            for e in range(2)]
  for e, seen in enumerate(epochs):
    assert len(set(seen.tolist())) == spe * BATCH  # no repeats within an epoch
    assert (to_np(device_pipe.batch(e * spe))['epoch'] == e).all()
  assert not np.array_equal(epochs[0], epochs[1])


def test_resumed_stream_equals_uninterrupted_stream(device_pipe):
  k = 9
  uninterrupted = device_pipe.iterate(0)
  for _ in range(k):
    next(uninterrupted)
  resumed = device_pipe.iterate(k)
  for _ in range(3):
    assert_batches_equal(next(uninterrupted), next(resumed))


def test_device_batch_inside_a_jitted_step_with_traced_step(device_pipe):
  fn = device_pipe.batch_fn()

  @jax.jit
  def train_step(arrays, step):  # what the trainer does: no host work per step
    batch = fn(arrays, step)
    return batch['label'].sum(), batch['index']

  for step in (0, 7):
    total, index = train_step(device_pipe.arrays, jnp.int32(step))
    expected = to_np(device_pipe.batch(step))
    np.testing.assert_array_equal(np.asarray(index), expected['index'])
    assert int(total) == expected['label'].sum()
  direct = data.device_batch(device_pipe.arrays, 7, seed=0, batch_size=BATCH, num_examples=100)
  assert_batches_equal(direct, device_pipe.batch(7))


def test_grain_stream_equals_device_stream_and_resumes(device_pipe, data_dir, shardings,
                                                       monkeypatch):
  monkeypatch.setattr(host, 'CHUNK_STEPS', 4)  # exercise the hand-over between grain pipelines
  g = grain_pipe(data_dir, shardings)
  spe = g.steps_per_epoch
  stream = g.iterate(0)
  for step in range(2 * spe + 1):  # across epoch and chunk boundaries
    batch = next(stream)
    assert batch['image'].sharding.is_equivalent_to(shardings[1], 4)
    assert_batches_equal(batch, device_pipe.batch(step))
  resumed = g.iterate(spe + 2)
  assert_batches_equal(next(resumed), device_pipe.batch(spe + 2))


def test_grain_worker_processes_yield_the_same_stream(data_dir, shardings):
  in_process = grain_pipe(data_dir, shardings).host_batches(3)
  workers = grain_pipe(data_dir, shardings, num_workers=2).host_batches(3)
  for _ in range(4):
    assert_batches_equal(next(in_process), next(workers))


@pytest.mark.parametrize('process_count', [2, 4])
def test_simulated_processes_read_disjoint_covering_slices(data_dir, shardings, device_pipe,
                                                            process_count):
  streams = [grain_pipe(data_dir, shardings, process_index=p, process_count=process_count)
             .host_batches(2) for p in range(process_count)]
  for step in (2, 3):
    slices = [next(s) for s in streams]
    assert all(s['image'].shape[0] == BATCH // process_count for s in slices)
    indices = np.concatenate([s['index'] for s in slices])
    assert len(set(indices.tolist())) == BATCH  # disjoint
    np.testing.assert_array_equal(indices, to_np(device_pipe.batch(step))['index'])  # covering


def test_simulated_process_count_cannot_build_global_arrays(data_dir, shardings):
  g = grain_pipe(data_dir, shardings, process_index=0, process_count=2)
  with pytest.raises(data.DataError, match='simulates 2 processes'):
    next(g.iterate(0))
  with pytest.raises(data.DataError, match='not divisible'):
    grain_pipe(data_dir, shardings, process_count=3)


def test_eval_batches_cover_the_split_once_with_valid_flags(data_dir, shardings):
  replicated, batch_sharding = shardings
  dev = data.DevicePipeline.create('shapes', 'test', batch_size=BATCH, seed=0,
                                   sharding_replicated=replicated, sharding_batch=batch_sharding,
                                   data_dir=data_dir, shuffle=False, **SHAPES)
  g = data.GrainPipeline.create('shapes', 'test', batch_size=BATCH, seed=0,
                                sharding_batch=batch_sharding, data_dir=data_dir, **SHAPES)
  for batches in (list(dev.eval_batches()), list(g.eval_batches())):
    assert len(batches) == 2  # 30 examples in batches of 16, the last one padded
    valid = np.concatenate([to_np(b)['valid'] for b in batches])
    index = np.concatenate([to_np(b)['index'] for b in batches])
    np.testing.assert_array_equal(index[valid], np.arange(30))
    assert valid.sum() == 30 and batches[-1]['mask'].shape == (BATCH, 16, 16)
  for a, b in zip(dev.eval_batches(), g.eval_batches()):
    assert_batches_equal(a, b)


def test_make_pipeline_auto_chooses_by_size(data_dir, shardings, monkeypatch):
  cfg = data.default_config()
  cfg.name, cfg.data_dir = 'shapes', data_dir
  cfg.shapes.update(SHAPES)
  make = functools.partial(data.make_pipeline, cfg, split='train', batch_size=BATCH, seed=0,
                           sharding_replicated=shardings[0], sharding_batch=shardings[1])
  assert make().kind == 'device'
  monkeypatch.setattr(pipeline, 'DEVICE_BUDGET_BYTES', 1000)
  grain = make()
  assert grain.kind == 'grain'
  assert_batches_equal(next(grain.iterate(4)), make_device(make, cfg).batch(4))
  cfg.pipeline = 'tpu'
  with pytest.raises(data.DataError, match="config.data.pipeline must be one of"):
    make()


def make_device(make, cfg):
  cfg.pipeline = 'device'
  try:
    return make()
  finally:
    cfg.pipeline = 'auto'


def test_batch_larger_than_the_split_is_rejected_when_drawing(data_dir, shardings):
  dev = data.DevicePipeline.create('shapes', 'test', batch_size=32, seed=0,
                                   sharding_replicated=shardings[0], sharding_batch=shardings[1],
                                   data_dir=data_dir, **SHAPES)
  assert len(list(dev.eval_batches())) == 1  # evaluation still works
  with pytest.raises(data.DataError, match='batch_size=32 does not fit a split of 30'):
    dev.batch(0)


def test_synthetic_is_generated_on_the_device(shardings):
  kw = dict(image_shape=(8, 8, 3), num_classes=5, num_examples=64, dataset_seed=0)
  dev = data.DevicePipeline.create('synthetic', 'train', batch_size=BATCH, seed=0,
                                   sharding_replicated=shardings[0],
                                   sharding_batch=shardings[1], **kw)
  batch = to_np(dev.batch(1))
  assert batch['image'].shape == (BATCH, 8, 8, 3) and batch['image'].dtype == np.uint8
  assert 0 <= batch['label'].min() and batch['label'].max() < 5
  g = data.GrainPipeline.create('synthetic', 'train', batch_size=BATCH, seed=0,
                                sharding_batch=shardings[1], **kw)
  np.testing.assert_array_equal(to_np(next(g.iterate(1)))['index'], batch['index'])


def test_meshes_with_auto_axes_get_the_same_batches(device_pipe):
  from cnnlab.data import augment
  mesh = jax.make_mesh((len(jax.devices()),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  auto = dataclasses.replace(device_pipe, sharding_batch=NamedSharding(mesh, P('data')))
  batch = auto.batch(5)
  assert batch['image'].sharding.spec[0] == 'data'
  assert_batches_equal(batch, device_pipe.batch(5))
  cfg = {**data.config.augment_config().to_dict(), 'crop_padding': 2, 'flip': 'random',
         'mixup_alpha': 0.2}
  out = jax.jit(functools.partial(augment.apply, cfg))(jax.random.PRNGKey(0), batch)
  assert out['image'].shape == batch['image'].shape
