"""Transfer learning: transfer.init_from (what is copied by path and shape, what is re-initialised,
the report, the errors), optim.freeze (frozen parameters and batch norms bitwise unchanged),
optim.lr_multipliers (the update scaled), and the exact resume of a run whose optimizer is
partitioned. Sources are written as converted weights are (a checkpoint of fresh variables), so
only the target runs train."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import cnnlab
from cnnlab import config as config_lib, models, workdir as workdir_lib
from cnnlab.configs import base
from cnnlab.layers import norm
from cnnlab.train import loop, optim, step as step_lib, transfer
from cnnlab.train.checkpoint import Checkpointer
from cnnlab.train.state import TrainState
from cnnlab.workdir import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, 'experiments', 'quickstart.py')
DIGITS = (8, 8, 1)


@pytest.fixture(scope='module')
def data_dir(shared_data_dir):
  return shared_data_dir


def configure(config, data_dir, overrides):
  """`config` on the 8x8 digits, quiet, with dotted-key overrides (`optim__freeze=...`)."""
  settings = dict(data__name='digits', data__data_dir=data_dir, log__progress='none',
                  log__tensorboard=False, compilation_cache_dir='', train__batch_size=32,
                  train__num_steps=3, train__log_every_steps=1, train__eval_every_steps=2,
                  optim__learning_rate=0.05, optim__schedule='constant',
                  data__augment__translate=1, data__augment__rotate=0.0, data__augment__scale=0.0)
  for key, value in {**settings, **overrides}.items():
    config_lib.set_value(config, key.replace('__', '.'), value)
  return config


def tiny(data_dir, **overrides):
  """The quickstart's conv_stack, two stages of 8 and 16 channels with batch norm."""
  config = config_lib.load(QUICKSTART)
  base_model = dict(model__filters=(8, 16), model__kernel_size=3, model__pool='max', model__stride=1)
  return configure(config, data_dir, {**base_model, **overrides})


def encoder_classifier(data_dir, **overrides):
  """conv_encoder (one stride-2 level of 8 channels with batch norm, a dense head)."""
  config = base.get_config()
  config.model.name = 'conv_encoder'
  config.model.features = (8,)
  config.lock()
  return configure(config, data_dir, overrides)


def write_source(directory, name, *, seed, ema=False, **model_args):
  """A run directory holding `name`'s fresh variables for 8x8 digits (batch statistics moved off
  their initial values, EMA parameters when `ema`) as its checkpoint at step 0, with config.json:
  what `cnnlab.pretrained.save_converted` writes. Returns (variables, ema_params or None)."""
  model = models.create_model(name, **model_args)
  key = jax.random.key(seed)
  variables = compiled(lambda: model.init({'params': key, 'dropout': key}, jnp.zeros((1, *DIGITS)),
                                          train=False))()
  stats = jax.tree.map(lambda x: x + 0.5, variables.get('batch_stats', {}))
  ema_params = jax.tree.map(lambda x: x + 1.0, variables['params']) if ema else None
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'], batch_stats=stats,
                     opt_state=optax.EmptyState(), rng=jax.random.PRNGKey(0), ema_params=ema_params,
                     loss_scale=jnp.ones((), jnp.float32), good_steps=jnp.zeros((), jnp.int32),
                     skips=jnp.zeros((), jnp.int32))
  ckpt = Checkpointer(str(directory), keep=1)
  try:
    ckpt.save(0, state, loop={})
  finally:
    ckpt.close()
  config = base.get_config()
  config.model.name = name
  workdir_lib.atomic_write(os.path.join(directory, workdir_lib.CONFIG), config_lib.to_json(config))
  return {'params': variables['params'], 'batch_stats': stats}, ema_params


def compiled(fn, *args):
  """`fn` jitted for `args` at XLA:CPU's lowest backend optimisation, as Run.initial_state
  compiles: a small model's initialisation or step compiles in a few seconds instead of tens on a
  loaded 2-core machine."""
  return jax.jit(fn).lower(*args).compile(compiler_options={'xla_backend_optimization_level': 0})


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def trees_differ(a, b) -> bool:
  return all(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---- configuration ----

def test_the_keys_take_command_line_values_and_survive_config_json():
  config = config_lib.load(QUICKSTART, [
      'transfer.init_from=runs/pretrain', 'transfer.init_step=1200', "transfer.init_exclude=head",
      "optim.freeze=('stage1_*', '*/norm')", "optim.lr_multipliers=(('stage2_*', 0.1),)"])
  assert config.transfer.init_step == 1200 and config.transfer.init_exclude == ('head',)
  assert config.optim.freeze == ('stage1_*', '*/norm')
  assert optim.lr_multipliers(config.optim.lr_multipliers) == (('stage2_*', 0.1),)
  config_lib.set_value(config, 'transfer.init_step', 'best')
  config_lib.set_value(config, 'optim.lr_multipliers', ('head', 2))  # one pair on its own
  assert optim.lr_multipliers(config.optim.lr_multipliers) == (('head', 2.0),)
  again = config_lib.from_json(config_lib.to_json(config))
  assert again.to_dict() == config.to_dict()
  assert transfer.parse_step('1200') == 1200 and transfer.parse_step('best') == 'best'


def test_patterns_match_paths_and_the_modules_above_them():
  assert transfer.matches('head', 'head/kernel') and transfer.matches('head/*', 'head/kernel')
  assert transfer.matches('*/norm', 'stage1_conv1/norm/scale')
  assert transfer.matches('stage1_*', 'stage1_conv1/conv/kernel')
  assert not transfer.matches('head', 'stage1_head/kernel') and not transfer.matches('conv', 'a/conv/k')


def test_bad_settings_are_listed_before_anything_compiles(data_dir):
  config = tiny(data_dir, optim__freeze=('stage9*', '*'), optim__lr_multipliers=(('nope', 0.5),),
                transfer__init_from='elsewhere', transfer__init_exclude=('heads',),
                transfer__init_step='soon')
  with pytest.raises(config_lib.ConfigError) as e:
    loop.setup(config)
  message = str(e.value)
  for needle in ("optim.freeze: pattern 'stage9*' matches no parameter of the model",
                 'stage1_conv1/conv/kernel',  # a few existing paths are listed
                 "optim.lr_multipliers: pattern 'nope' matches no parameter",
                 "transfer.init_exclude: pattern 'heads' matches no parameter or batch statistic",
                 "head/kernel",  # the close match
                 "transfer.init_step='soon': expected 'latest', 'best' or a step number",
                 "optim.freeze=('stage9*', '*') freezes every parameter"):
    assert needle in message, (needle, message)
  with pytest.raises(config_lib.ConfigError, match=r"transfer.init_exclude=\('head',\) has no effect "
                     'without transfer.init_from'):
    loop.setup(tiny(data_dir, transfer__init_exclude=('head',)))
  with pytest.raises(config_lib.ConfigError, match='optim.lr_multipliers=.*factor > 0.*optim.freeze'):
    loop.setup(tiny(data_dir, optim__lr_multipliers=(('head', 0.0),)))


# ---- init_from ----

def test_init_from_copies_what_fits_and_reinitialises_the_rest(tmp_path, data_dir):
  """A 5-class source into the 10-class model: every tensor but the head is the source's; the
  head keeps this run's initialisation, and the report says why."""
  config = tiny(data_dir, parallel__num_devices=1, transfer__init_from=str(tmp_path / 'source'))
  run = loop.setup(config)
  source, _ = write_source(tmp_path / 'source', 'conv_stack', seed=7, num_classes=5,
                           **models.model_kwargs(config.model))
  fresh = run.initial_state()
  state, report = transfer.initialize(fresh, config.transfer, 'conv_stack')

  for name in ('stage1_conv1', 'stage2_conv1'):
    assert_trees_equal(state.params[name], source['params'][name])
    assert_trees_equal(state.batch_stats[name], source['batch_stats'][name])
    assert trees_differ(state.params[name]['conv'], fresh.params[name]['conv'])  # (a real copy)
  assert_trees_equal(state.params['head'], fresh.params['head'])
  assert report['reinitialised'] == {
      'excluded': [], 'not_in_source': [],
      'shape_changed': {'params/head/bias': {'shape': [10], 'source_shape': [5]},
                        'params/head/kernel': {'shape': [16, 10], 'source_shape': [16, 5]}}}
  assert report['unused'] == ['params/head/bias', 'params/head/kernel']
  assert len(report['copied']) == 10 and report['step'] == 0 and report['source_model'] == 'conv_stack'
  line = transfer.summary_line(report)
  assert 'copied 10 tensors' in line and 'head/kernel (16, 10) (source (16, 5))' in line

  # init_exclude re-initialises tensors that fit, and says so.
  excluded = ml_collections.ConfigDict({**config.transfer.to_dict(), 'init_exclude': ('stage1_conv1',)})
  state, report = transfer.initialize(fresh, excluded, 'conv_stack')
  assert_trees_equal(state.params['stage1_conv1'], fresh.params['stage1_conv1'])
  assert_trees_equal(state.batch_stats['stage1_conv1'], fresh.batch_stats['stage1_conv1'])
  assert_trees_equal(state.params['stage2_conv1'], source['params']['stage2_conv1'])
  assert sorted(report['reinitialised']['excluded']) == [
      'batch_stats/stage1_conv1/norm/mean', 'batch_stats/stage1_conv1/norm/var',
      'params/stage1_conv1/conv/kernel', 'params/stage1_conv1/norm/bias',
      'params/stage1_conv1/norm/scale']
  assert 'stage1_conv1/* (5) (init_exclude)' in transfer.summary_line(report)


def test_init_from_errors_name_the_directory_the_step_and_both_models(tmp_path, data_dir):
  config = tiny(data_dir, parallel__num_devices=1, transfer__init_from=str(tmp_path / 'none'))
  run = loop.setup(config)
  fresh = run.initial_state()

  def attempt(**keys):
    return transfer.initialize(fresh, ml_collections.ConfigDict(
        {'init_from': None, 'init_step': 'latest', 'init_exclude': (), **keys}), 'conv_stack')
  with pytest.raises(config_lib.ConfigError, match=r"transfer.init_from='.*none': no such directory"):
    attempt(init_from=str(tmp_path / 'none'))
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(config_lib.ConfigError, match=r"transfer.init_from='.*empty' holds no committed checkpoint"):
    attempt(init_from=str(tmp_path / 'empty'))
  write_source(tmp_path / 'autoencoder', 'conv_autoencoder', seed=1, features=(8,))
  with pytest.raises(config_lib.ConfigError, match=r'no checkpoint at step 7 \(committed steps: \[0\]\)'):
    attempt(init_from=str(tmp_path / 'autoencoder'), init_step=7)
  with pytest.raises(config_lib.ConfigError, match=r"init_step='best': no checkpoint .* carries an evaluation"):
    attempt(init_from=str(tmp_path / 'autoencoder'), init_step='best')

  # Through the loop: nothing to transfer fails before the run directory is written.
  workdir = tmp_path / 'run'
  config = tiny(data_dir, parallel__num_devices=1, transfer__init_from=str(tmp_path / 'autoencoder'))
  with pytest.raises(config_lib.ConfigError,
                     match=r"nothing to transfer: .*'conv_stack' \(this run\).*'conv_autoencoder'"):
    loop.train_and_evaluate(config, str(workdir))
  assert not {'config.json', 'metrics.jsonl'} & set(os.listdir(workdir))
  assert not os.listdir(workdir / 'checkpoints')


def test_an_autoencoders_encoder_under_a_linear_probe_then_resume(tmp_path, data_dir, capsys):
  """conv_autoencoder -> conv_encoder by the 'encoder/...' subtree, frozen (a linear probe): the
  encoder's parameters (the source's EMA ones) and batch statistics stay the source's bit for bit
  through training; the decoder is reported unused. A run stopped and resumed after its source
  is gone (init_from is not applied again) ends exactly where an uninterrupted one does."""
  source_dir = tmp_path / 'autoencoder'
  source, ema = write_source(source_dir, 'conv_autoencoder', seed=3, ema=True, features=(8,))
  settings = dict(transfer__init_from=str(source_dir), optim__freeze=('encoder',),
                  optim__lr_multipliers=(('head/bias', 2.0),), optim__weight_decay=5e-4,
                  checkpoint__keep=3, parallel__num_devices=1)
  loop.train_and_evaluate(encoder_classifier(data_dir, **settings), str(tmp_path / 'whole'))
  err = capsys.readouterr().err
  assert 'cnnlab: transfer.init_from' in err and 'EMA parameters' in err
  assert 'copied 5 tensors' in err and 'decoder/* (7)' in err, err
  assert 'head/* (2) (not in the source)' in err, err
  report = json.load(open(tmp_path / 'whole' / transfer.TRANSFER_FILE))
  assert report['reinitialised']['not_in_source'] == ['params/head/bias', 'params/head/kernel']
  assert len(report['unused']) == 7 and all('/decoder/' in p for p in report['unused'])
  assert report['source_ema'] is True
  whole = cnnlab.load_run(str(tmp_path / 'whole'))
  assert_trees_equal(whole.variables['params']['encoder'], ema['encoder'])
  assert_trees_equal(whole.variables['batch_stats']['encoder'], source['batch_stats']['encoder'])
  assert np.any(np.asarray(whole.variables['params']['head']['bias']) != 0)  # the head trained

  # Two launches, the source deleted in between.
  parts = tmp_path / 'parts'
  loop.train_and_evaluate(encoder_classifier(data_dir, **settings, train__num_steps=2), str(parts))
  shutil.rmtree(source_dir)
  capsys.readouterr()
  loop.train_and_evaluate(encoder_classifier(data_dir, **settings), str(parts))
  assert 'transfer.init_from' not in capsys.readouterr().err
  losses = lambda d: [r['loss'] for r in read_metrics(str(d)) if r['kind'] == 'train']  # noqa: E731
  assert losses(parts) == losses(tmp_path / 'whole') and len(losses(parts)) == 3

  def saved(workdir):  # the whole TrainState at step 3: parameters, statistics, optimizer state
    ckpt = Checkpointer(str(workdir), read_only=True)
    try:
      return ckpt.restore_arrays(3)
    finally:
      ckpt.close()
  assert_trees_equal(saved(parts), saved(tmp_path / 'whole'))


# ---- freeze and learning-rate multipliers ----

def test_frozen_batch_norm_trains_with_its_running_statistics():
  model = models.create_model('conv_stack', filters=(8, 16), kernel_size=3, num_classes=10)
  key = jax.random.key(0)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((4, *DIGITS)), jnp.float32)

  def outputs():
    variables = model.init({'params': key}, images[:1], train=False)
    variables['batch_stats'] = jax.tree.map(lambda x: x + 0.25, variables['batch_stats'])
    with norm.frozen_batch_norm({'stage1_conv1/norm', 'stage2_conv1/norm'}):
      frozen = model.apply(variables, images, train=True, mutable=['batch_stats'])
    trained = model.apply(variables, images, train=True, mutable=['batch_stats'])
    return variables, frozen, trained, model.apply(variables, images, train=False)
  variables, (frozen, frozen_stats), (_, trained_stats), inference = compiled(outputs)()
  np.testing.assert_allclose(frozen, inference, rtol=1e-6, atol=1e-6)
  assert_trees_equal(frozen_stats['batch_stats'], variables['batch_stats'])
  assert trees_differ(trained_stats['batch_stats'], variables['batch_stats'])  # not frozen


def test_freeze_and_lr_multipliers_in_the_train_step(data_dir):
  """Three plain-SGD steps with stage1_conv1 frozen: its parameters and batch statistics are
  bitwise those it started with while the others change. The same from the same state with
  stage2_conv1's learning rate x 0.25: its first update is 0.25 x the other run's, and the
  tensors without a multiplier take the same update."""
  plain = dict(parallel__num_devices=1, optim__momentum=0.0, optim__nesterov=False,
               optim__weight_decay=0.0, optim__freeze=('stage1_conv1',))
  runs = [loop.setup(tiny(data_dir, **plain)),
          loop.setup(tiny(data_dir, **plain,
                          optim__lr_multipliers=(('stage2_conv1', 0.25), ('stage2*', 4.0))))]
  assert runs[0].settings.frozen_batch_norm == {'stage1_conv1/norm'}
  start = runs[0].initial_state()
  states = []
  for run in runs:
    state = start.replace(opt_state=run.settings.tx.init(start.params))
    train_step = compiled(step_lib.make_train_step(run.settings), state, run.train_data.batch(0))
    states.append([])
    for i in range(3):
      state, metrics = train_step(state, run.train_data.batch(i))
      assert int(metrics['nonfinite']) == 0
      states[-1].append(state)
  for state in (states[0][-1], states[1][-1]):
    assert_trees_equal(state.params['stage1_conv1'], start.params['stage1_conv1'])
    assert_trees_equal(state.batch_stats['stage1_conv1'], start.batch_stats['stage1_conv1'])
    for name in ('stage2_conv1', 'head'):
      assert trees_differ(state.params[name], start.params[name])
    assert trees_differ(state.batch_stats['stage2_conv1'], start.batch_stats['stage2_conv1'])
  # The first pattern that matches applies (0.25, not 4). These are parameter differences, not
  # the updates themselves: allow the rounding of p + u (an ulp of p).
  delta = [jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                        s[0].params['stage2_conv1'], start.params['stage2_conv1']) for s in states]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 0.25 * b, rtol=1e-5, atol=1e-7),
               delta[1], delta[0])
  assert_trees_equal(states[1][0].params['head'], states[0][0].params['head'])
  # The frozen parameters have no optimizer state: SGD with momentum keeps one for the others.
  c = ml_collections.ConfigDict({**runs[0].config.optim.to_dict(), 'momentum': 0.9})
  sizes = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree))  # noqa: E731
  with_freeze = optim.optimizer(c, runs[0].settings.learning_rate).init(start.params)
  c.freeze = ()
  without = optim.optimizer(c, runs[0].settings.learning_rate).init(start.params)
  assert sizes(without) - sizes(with_freeze) == sizes(start.params['stage1_conv1'])


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_the_partitioned_optimizer_keeps_momentum_and_weight_decay_exact(name):
  """On the same gradients for three steps: the trained tensors' updates are the plain
  optimizer's (momentum and weight decay included) bit for bit, times the factor where one
  applies; the frozen tensor's are exactly zero."""
  c = base.get_config().optim
  c.name, c.weight_decay, c.momentum = name, 1e-2, 0.9
  lr = optim.schedule(c, 10, 10)
  plain = optim.optimizer(c, lr)
  c.freeze, c.lr_multipliers = ('a/kernel',), (('b', 0.5),)
  parted = optim.optimizer(c, lr)
  rng = np.random.default_rng(0)
  normal = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
  params = {'a': {'kernel': normal((3, 4)), 'bias': jnp.ones(4)}, 'b': {'kernel': normal((4, 2))}}
  states = [plain.init(params), parted.init(params)]
  for _ in range(3):
    grads = jax.tree.map(lambda p: normal(p.shape), params)
    (u0, states[0]), (u1, states[1]) = (plain.update(grads, states[0], params),
                                        parted.update(grads, states[1], params))
    np.testing.assert_array_equal(u1['a']['kernel'], np.zeros((3, 4), np.float32))
    np.testing.assert_array_equal(u1['a']['bias'], u0['a']['bias'])
    np.testing.assert_array_equal(u1['b']['kernel'], np.float32(0.5) * u0['b']['kernel'])
