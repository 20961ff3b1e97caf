"""What a new user hits: bad input gets one clear line and exit 2, and nothing is lost or
misreported (a misspelt key in a file, a failed forced resume, a finished run relaunched, float
images given to predict, a run directory loaded without its dataset, a report without the model)."""

import json
import os
import shutil

import numpy as np
import pytest

import cnnlab
from cnnlab import cli, config as config_lib, workdir as workdir_lib
from cnnlab.sweeps import report
from cnnlab.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, 'experiments', 'quickstart.py')

TINY = ['model.filters=(8, 16)', 'model.kernel_size=3', "model.pool='max'", 'model.stride=1',
        "data.name='digits'", 'train.batch_size=32', 'train.num_steps=3', 'train.log_every_steps=1',
        'data.augment.translate=1', 'data.augment.rotate=0.0', 'data.augment.scale=0.0',
        "log.progress='none'", 'log.tensorboard=False', "compilation_cache_dir=''"]


@pytest.fixture(scope='module')
def data_dir(shared_data_dir):
  return shared_data_dir


def tiny_args(data_dir, *extra):
  return [*TINY, f"data.data_dir='{data_dir}'", *extra]


def train_cli(workdir, data_dir, *extra):
  return cli.main(['train', '--config', QUICKSTART, '--workdir', str(workdir),
                   *(f'--config.{a}' for a in tiny_args(data_dir, *extra))])


def write_experiment(tmp_path, body):
  path = tmp_path / 'exp.py'
  path.write_text('from cnnlab.configs import base\n\ndef get_config():\n'
                  '  config = base.get_config()\n' + body + '  return config\n')
  return str(path)


# ---- a config file cannot misspell what it sets ----

@pytest.mark.parametrize('line,key,suggestion', [
    ('config.train.batch_sise = 64', 'train.batch_sise', 'train.batch_size'),
    ('config.optim.learnin_rate = 0.01', 'optim.learnin_rate', 'optim.learning_rate'),
    ('config.data.augment.rotat = 5.0', 'data.augment.rotat', 'data.augment.rotate'),
    ('config.model.kernel_sise = 3', 'model.kernel_sise', 'model.kernel_size'),
])
def test_a_misspelt_key_in_a_file_fails_with_a_suggestion(tmp_path, line, key, suggestion):
  path = write_experiment(tmp_path, f"  config.model.name = 'conv_stack'\n  {line}\n")
  with pytest.raises(config_lib.ConfigError, match=f"'{key}'.*Did you mean '{suggestion}'"):
    config_lib.load(path)


def test_a_broken_config_file_names_file_and_line(tmp_path, capsys):
  bad = tmp_path / 'syntax.py'
  bad.write_text('def get_config(:\n  pass\n')
  assert cli.main(['train', '--config', str(bad), '--workdir', str(tmp_path / 'w')]) == 2
  assert f'{bad}:1: syntax error' in capsys.readouterr().err
  raising = write_experiment(tmp_path, "  raise RuntimeError('no GPU here')\n")
  assert cli.main(['train', '--config', raising, '--workdir', str(tmp_path / 'w')]) == 2
  err = capsys.readouterr().err
  assert f'{raising}:5: get_config() failed: RuntimeError: no GPU here' in err
  assert not (tmp_path / 'w').exists()


def test_a_workdir_that_cannot_be_one_is_refused_in_one_line(tmp_path, data_dir, capsys):
  a_file = tmp_path / 'file'
  a_file.write_text('')
  assert train_cli(a_file, data_dir) == 2
  assert 'is a file, not a directory' in capsys.readouterr().err
  assert train_cli(a_file / 'run', data_dir) == 2  # under a file: cannot be created, even as root
  assert 'cannot be created: Not a directory' in capsys.readouterr().err


def test_an_override_without_a_value_exits_2(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(['train', '--config', QUICKSTART, '--workdir', '/tmp/x', '--config.seed'])
  assert e.value.code == 2 and '--config.seed needs a value' in capsys.readouterr().err


# ---- nothing is lost ----

def test_a_failed_forced_resume_leaves_the_run_as_it_was(tmp_path, data_dir, capsys):
  workdir = tmp_path / 'run'
  assert train_cli(workdir, data_dir) == 0
  before = {name: (workdir / name).read_text()
            for name in ('config.json', 'summary.json', 'metrics.jsonl', 'provenance.json')}
  changed = train_cli(workdir, data_dir, 'train.num_steps=5', 'model.filters=(8, 32)',
                      'checkpoint.allow_config_change=True')
  assert changed == 2
  err = capsys.readouterr().err
  assert 'stage2_conv1/conv/kernel: saved (3, 3, 8, 16), the model has (3, 3, 8, 32)' in err
  assert {name: (workdir / name).read_text() for name in before} == before
  assert train_cli(workdir, data_dir, 'train.num_steps=5') == 0  # the original run goes on
  assert cnnlab.load_run(str(workdir)).step == 5


def test_a_finished_run_relaunched_is_a_no_op_and_the_summary_covers_every_launch(
    tmp_path, data_dir, capsys):
  workdir = tmp_path / 'run'
  assert train_cli(workdir, data_dir) == 0
  first = json.loads((workdir / 'summary.json').read_text())
  assert train_cli(workdir, data_dir) == 0
  assert 'already finished' in capsys.readouterr().err
  assert json.loads((workdir / 'summary.json').read_text()) == first
  assert train_cli(workdir, data_dir, 'train.num_steps=5') == 0  # longer: resumes
  summary = json.loads((workdir / 'summary.json').read_text())
  assert [(x['start_step'], x['end_step']) for x in summary['launches']] == [(0, 3), (3, 5)]
  for key in ('train_time_s', 'wall_time_s', 'compile_time_s'):
    assert summary[key] == pytest.approx(sum(x[key] for x in summary['launches']))
  assert summary['train_time_s'] > first['train_time_s']
  assert "the 'onecycle' learning-rate schedule is recomputed" in capsys.readouterr().err
  assert summary['images_per_sec'] == pytest.approx(5 * 32 / summary['train_time_s'])


# ---- a run directory stands on its own ----

def test_predict_takes_uint8_or_floats_with_their_range(tmp_path, data_dir):
  summary = loop.train_and_evaluate(config_lib.load(QUICKSTART, tiny_args(data_dir)),
                                    str(tmp_path / 'run'))
  run = cnnlab.load_run(str(tmp_path / 'run'))
  from cnnlab import data
  source = data.load('digits', 'test', data_dir=data_dir)
  images = np.stack([source[i]['image'] for i in range(len(source))])
  labels = np.array([source[i]['label'] for i in range(len(source))])
  accuracy = lambda logits: float(np.mean(np.argmax(logits, -1) == labels))  # noqa: E731
  expected = summary['final_eval']['accuracy']
  assert accuracy(run.predict(images)) == pytest.approx(expected, abs=1e-6)
  assert accuracy(run.predict(images / 255.0, value_range=(0, 1))) == pytest.approx(expected, abs=2e-3)
  assert accuracy(run.predict(images.astype(np.float32), value_range=(0, 255))) == \
      pytest.approx(expected, abs=2e-3)
  with pytest.raises(ValueError, match=r'float64 images \(values 0\.\.1\).*value_range=\(0, 1\)'):
    run.predict(images / 255.0)
  with pytest.raises(ValueError, match='outside value_range'):
    run.predict(images.astype(np.float32), value_range=(0, 1))
  with pytest.raises(ValueError, match='int64 images'):
    run.predict(images.astype(np.int64))


def test_load_run_needs_no_dataset(tmp_path, monkeypatch):
  workdir, own_data = tmp_path / 'run', tmp_path / 'data'
  loop.train_and_evaluate(config_lib.load(QUICKSTART, tiny_args(own_data)), str(workdir))
  shutil.rmtree(own_data)  # the dataset is gone from where the run read it
  from cnnlab import data
  monkeypatch.setattr(data, 'info', lambda *a, **k: pytest.fail('load_run read the dataset'))
  run = cnnlab.load_run(str(workdir))
  assert run.image_shape == (8, 8, 1) and run.num_classes == 10
  assert run.predict(np.zeros((2, 8, 8, 1), np.uint8)).shape == (2, 10)


def test_report_reads_macs_and_receptive_field_recorded_at_training(tmp_path, data_dir, capsys,
                                                                   monkeypatch):
  root = tmp_path / 'root'
  for seed in (0, 1):
    assert train_cli(root / f'seed={seed}', data_dir, f'seed={seed}') == 0
  model = json.loads((root / 'seed=0' / 'model.json').read_text())
  assert model['macs'] > 0 and model['receptive_field'] == [10.0, 10.0]
  from cnnlab import analysis
  monkeypatch.setattr(analysis, 'summarize', lambda *a, **k: pytest.fail('the report re-analysed'))
  paths = report.write(str(root), plots=False)
  rows = open(paths['csv']).read()
  assert f",{model['macs']},10," in rows
  assert paths['notes'] == []
  # A run written before the figures were recorded, whose model cannot be built here: said.
  old = root / 'seed=0'
  os.remove(old / 'model.json')
  summary = json.loads((old / 'summary.json').read_text())
  del summary['macs']
  (old / 'summary.json').write_text(json.dumps(summary))
  config = json.loads((old / 'config.json').read_text())
  config['model']['imports'] = ['module_that_is_not_here']
  (old / 'config.json').write_text(json.dumps(config))
  paths = report.write(str(root), plots=False)
  assert any('seed=0: no MACs or receptive field' in n and 'module_that_is_not_here' in n
             for n in paths['notes'])


def test_safe_join_refuses_dot_dot_even_when_it_comes_back(tmp_path):
  with pytest.raises(workdir_lib.UnsafeCheckpointError, match='would leave'):
    workdir_lib.safe_join(str(tmp_path), 'runs/../runs')
