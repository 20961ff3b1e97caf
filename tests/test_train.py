"""The training engine: configs and their errors, end-to-end runs, outputs, determinism, the
non-finite policy, and equivalence of the parallel strategies on the 8 simulated CPU devices."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnnlab
from cnnlab import cli, config as config_lib, data
from cnnlab.tasks.classification import cross_entropy
from cnnlab.train import loop, step as step_lib
from cnnlab.workdir import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, 'experiments')


@pytest.fixture(scope='module')
def data_dir(shared_data_dir):
  return shared_data_dir


def make_config(experiment='quickstart', data_dir=None, **overrides):
  """The experiment's config with dotted-key overrides (`train__batch_size=16` style keys)."""
  config = config_lib.load(os.path.join(EXPERIMENTS, f'{experiment}.py'))
  if data_dir:
    config_lib.set_value(config, 'data.data_dir', data_dir)
  config_lib.set_value(config, 'log.progress', 'none')
  config_lib.set_value(config, 'compilation_cache_dir', '')
  for key, value in overrides.items():
    config_lib.set_value(config, key.replace('__', '.'), value)
  return config


def tiny(data_dir, **overrides):
  """conv_stack on the 8x8 digits: seconds to compile, for engine behaviour tests."""
  base = dict(model__filters=(8, 16), model__kernel_size=3, model__pool='max', model__stride=1,
              data__name='digits', train__batch_size=32, train__num_steps=4, train__log_every_steps=1,
              train__eval_every_steps=2, optim__learning_rate=0.05, optim__schedule='constant',
              data__augment__translate=1, data__augment__rotate=0.0, data__augment__scale=0.0)
  return make_config('quickstart', data_dir, **{**base, **overrides})


def train_losses(workdir):
  return [r['loss'] for r in read_metrics(workdir) if r['kind'] == 'train']


# ---- configs ----

def test_misspelt_override_fails_with_suggestion():
  path = os.path.join(EXPERIMENTS, 'quickstart.py')
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'train.batch_sise'.*'train.batch_size'"):
    config_lib.load(path, ['train.batch_sise=64'])
  with pytest.raises(config_lib.ConfigError, match='train.batch_size=.abc.*expected int'):
    config_lib.load(path, ['train.batch_size=abc'])
  with pytest.raises(config_lib.ConfigError, match="'optim' is a section"):
    config_lib.load(path, ['optim=sgd'])
  config = config_lib.load(path, ['model.filters=(16, 32)', 'optim.learning_rate=1'])
  assert config.model.filters == (16, 32) and config.optim.learning_rate == 1.0


def test_model_arguments_take_one_value_or_one_per_stage():
  path = os.path.join(EXPERIMENTS, 'quickstart.py')
  config = config_lib.load(path, ['model.pool=max', 'model.stride=2'])
  assert config.model.pool == 'max' and config.model.stride == 2
  config = config_lib.load(path, ["model.pool=('max', 'avg', 'none')", 'model.kernel_size=[3, 5, 7]'])
  assert config.model.pool == ('max', 'avg', 'none') and config.model.kernel_size == (3, 5, 7)
  with pytest.raises(config_lib.ConfigError, match='train.batch_size=.*expected int'):
    config_lib.load(path, ['train.batch_size=(64, 64)'])  # outside the model, types hold


def test_validation_lists_every_problem_at_once(data_dir):
  config = make_config('quickstart', data_dir, train__batch_size=12, optim__name='sgdd',
                       model__name='resnet19', optim__momentum=1.5)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  message = str(e.value)
  for needle in ('train.batch_size=12 is not divisible by the 8 devices', "optim.name='sgdd'",
                 "unknown model 'resnet19'", 'optim.momentum=1.5'):
    assert needle in message


def test_validation_of_dataset_and_classes(data_dir):
  with pytest.raises(config_lib.ConfigError, match="data.name='mnist6k': unknown dataset.*mnist5k"):
    config_lib.validate(make_config('quickstart', data_dir, data__name='mnist6k'))
  with pytest.raises(config_lib.ConfigError, match='model.num_classes=5 does not fit classification on mnist5k, which needs 10'):
    config_lib.validate(make_config('quickstart', data_dir, model__num_classes=5))
  with pytest.raises(config_lib.ConfigError, match="model: model 'conv_stack' has no argument 'kernel'"):
    config = make_config('quickstart', data_dir)
    with config.model.unlocked():
      config.model.kernel = 3
    config_lib.validate(config)


def test_cli_rejects_a_bad_config_before_writing_anything(tmp_path, capsys):
  workdir = tmp_path / 'run'
  code = cli.main(['train', '--config', os.path.join(EXPERIMENTS, 'quickstart.py'),
                   '--workdir', str(workdir), '--config.train.batch_sise=3'])
  assert code == 2 and not workdir.exists()
  assert "Did you mean 'train.batch_size'" in capsys.readouterr().err


def test_label_smoothing_is_torchs_and_the_step_uses_it(data_dir):
  """Cross-entropy against (1 - e) one_hot + e / K, as PyTorch's label_smoothing computes it."""
  torch = pytest.importorskip('torch')
  logits = jax.random.normal(jax.random.key(0), (16, 10)) * 3.0
  labels = jax.random.randint(jax.random.key(1), (16,), 0, 10)
  for smoothing in (0.0, 0.1, 0.3):
    expected = torch.nn.functional.cross_entropy(
        torch.tensor(np.asarray(logits)), torch.tensor(np.asarray(labels, np.int64)), reduction='none',
        label_smoothing=smoothing).numpy()
    np.testing.assert_allclose(cross_entropy(logits, labels, 10, smoothing), expected,
                               rtol=1e-5, atol=1e-6)
  run = loop.setup(tiny(data_dir, train__label_smoothing=0.1, parallel__num_devices=1))
  loss = run.task.per_example_loss(logits, {'label': labels})
  np.testing.assert_allclose(loss, cross_entropy(logits, labels, 10, 0.1), rtol=1e-6)
  assert not np.allclose(loss, cross_entropy(logits, labels, 10, 0.0))


# ---- end to end ----

def test_run_writes_its_outputs_and_is_deterministic(tmp_path, data_dir):
  config = tiny(data_dir)
  summary = loop.train_and_evaluate(config, str(tmp_path / 'a'))
  for key in ('final_eval', 'best_eval', 'num_params', 'compile_time_s', 'wall_time_s'):
    assert summary[key] is not None
  assert set(summary['final_eval']) >= {'accuracy', 'loss'}
  assert json.load(open(tmp_path / 'a' / 'summary.json'))['num_params'] == summary['num_params']
  records = read_metrics(str(tmp_path / 'a'))
  train = [r for r in records if r['kind'] == 'train']
  evals = [r for r in records if r['kind'] == 'eval']
  assert [r['step'] for r in train] == [1, 2, 3, 4] and [r['step'] for r in evals] == [2, 4]
  for key in ('loss', 'accuracy', 'learning_rate', 'images_per_sec', 'step_time_s'):
    assert all(np.isfinite(r[key]) for r in train), key
  assert os.listdir(tmp_path / 'a' / 'tensorboard')
  assert config_lib.from_json(open(tmp_path / 'a' / 'config.json').read()).model.filters == (8, 16)
  # Same seed, same numbers; another seed, other numbers.
  loop.train_and_evaluate(tiny(data_dir), str(tmp_path / 'b'))
  assert train_losses(str(tmp_path / 'a')) == train_losses(str(tmp_path / 'b'))
  loop.train_and_evaluate(tiny(data_dir, seed=1), str(tmp_path / 'c'))
  assert train_losses(str(tmp_path / 'a')) != train_losses(str(tmp_path / 'c'))


def test_load_run_predicts_like_the_evaluation(tmp_path, data_dir):
  summary = loop.train_and_evaluate(tiny(data_dir), str(tmp_path))
  run = cnnlab.load_run(str(tmp_path))
  assert run.step == 4 and run.config.model.filters == (8, 16)
  source = data.load('digits', 'test', data_dir=data_dir)
  images = np.stack([source[i]['image'] for i in range(len(source))])
  labels = np.array([source[i]['label'] for i in range(len(source))])
  accuracy = float(np.mean(np.argmax(run.predict(images), -1) == labels))
  assert accuracy == pytest.approx(summary['final_eval']['accuracy'], abs=1e-6)


# ---- parallel strategies ----

def test_sharded_parameters_train_as_one_device_end_to_end(tmp_path, data_dir):
  """FSDP on 8 devices, four steps with evaluations and checkpoints, read back with load_run:
  the same losses and variables as one device. (One step of every shipped experiment under jit
  and pmap on 2 and 4 devices: tests/test_parallel_equivalence.py.)"""
  one = tiny(data_dir, parallel__num_devices=1)
  loop.train_and_evaluate(one, str(tmp_path / 'one'))
  many = tiny(data_dir, parallel__num_devices=8, parallel__strategy='jit', parallel__fsdp=True)
  loop.train_and_evaluate(many, str(tmp_path / 'many'))
  np.testing.assert_allclose(train_losses(str(tmp_path / 'many')), train_losses(str(tmp_path / 'one')),
                             rtol=2e-5)
  a, b = cnnlab.load_run(str(tmp_path / 'one')), cnnlab.load_run(str(tmp_path / 'many'))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5),
               a.variables, b.variables)


# ---- non-finite policy ----

def test_nonfinite_update_is_never_applied(data_dir):
  run = loop.setup(tiny(data_dir, parallel__num_devices=1))
  train_step = jax.jit(step_lib.make_train_step(run.settings))
  state = run.initial_state()
  good = run.train_data.batch(0)
  poisoned = {**good, 'image': good['image'].astype(jnp.float32).at[0, 0, 0, 0].set(jnp.nan)}
  after, metrics = train_step(state, poisoned)
  assert int(metrics['nonfinite']) == 1 and int(after.skips) == 1 and int(after.step) == 1
  for old, new in ((state.params, after.params), (state.opt_state, after.opt_state),
                   (state.batch_stats, after.batch_stats)):
    jax.tree.map(np.testing.assert_array_equal, old, new)
  again, metrics = train_step(after, good)
  assert int(metrics['nonfinite']) == 0 and int(again.skips) == 0
  assert not np.array_equal(again.params['head']['kernel'], after.params['head']['kernel'])


def test_nonfinite_policy_halts_with_the_step_range(tmp_path, data_dir):
  with pytest.raises(loop.NonFiniteError, match=r'steps 1\.\.2'):
    loop.train_and_evaluate(tiny(data_dir, optim__learning_rate=float('inf'),
                                 train__log_every_steps=2), str(tmp_path / 'halt'))
  with pytest.raises(loop.NonFiniteError, match=r'3 consecutive non-finite steps'):
    loop.train_and_evaluate(tiny(data_dir, optim__learning_rate=float('inf'),
                                 train__on_nonfinite='skip', train__max_consecutive_skips=3,
                                 train__num_steps=6), str(tmp_path / 'skip'))


# ---- what the loop measures and starts ----

def test_pmap_compiles_before_training_so_its_compile_time_is_not_training_time(data_dir):
  """Under pmap, as under jit, the step is compiled by Run.compile_train: the first training call
  compiles nothing (so the loop's compile_time_s holds it, not train_time_s)."""
  import jax.monitoring
  run = loop.setup(tiny(data_dir, parallel__strategy='pmap', parallel__num_devices=2,
                        model__filters=(8, 12)))
  state = run.par.place_state(run.initial_state())
  train_fn, data_arg = run.compile_train(state)
  events = []
  listen = lambda name, *a, **k: events.append(name)  # noqa: E731
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    jax.block_until_ready(train_fn(state, data_arg))
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert not [e for e in events if 'compile' in e], events


def test_a_host_pipeline_is_started_once(tmp_path, data_dir, monkeypatch):
  """The grain pipeline's first batch is checked, compiled against and trained on: one pipeline,
  not a throwaway one for the check."""
  from cnnlab.data.host import GrainPipeline
  started = []
  iterate = GrainPipeline.iterate
  monkeypatch.setattr(GrainPipeline, 'iterate',
                      lambda self, start_step=0: started.append(start_step) or iterate(self, start_step))
  loop.train_and_evaluate(tiny(data_dir, data__pipeline='grain', data__grain_workers=0),
                          str(tmp_path))
  assert started == [0]
