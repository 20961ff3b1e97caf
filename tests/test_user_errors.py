"""What a new user hits: bad input gets one clear line and exit 2, and nothing is lost or
misreported (a misspelt key in a file, a failed forced resume, a finished run relaunched, float
images given to predict, a run directory loaded without its dataset, a report without the model);
one run at a glance (`cnnlab report RUN_DIR`, `cnnlab runs ROOT`)."""

import json
import os
import shutil

import numpy as np
import pytest

import cnnlab
from cnnlab import cli, config as config_lib, runs, workdir as workdir_lib
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


# ---- one run at a glance ----

def test_a_run_reports_its_curves_and_confusion_matrix(tmp_path, data_dir, capsys):
  workdir = tmp_path / 'run'
  assert train_cli(workdir, data_dir, 'train.num_steps=6', 'train.eval_every_steps=3') == 0
  summary = json.loads((workdir / 'summary.json').read_text())
  from cnnlab import data
  source = data.load('digits', 'test', data_dir=data_dir)
  matrix = np.array(summary['confusion_matrix'])
  assert matrix.shape == (10, 10) and matrix.sum() == len(source)
  assert np.trace(matrix) / matrix.sum() == pytest.approx(summary['final_eval']['accuracy'])
  np.testing.assert_allclose(summary['per_class_accuracy'], np.diag(matrix) / matrix.sum(1))
  # The same counts from the reloaded run's predictions.
  images = np.stack([source[i]['image'] for i in range(len(source))])
  labels = np.array([source[i]['label'] for i in range(len(source))])
  predicted = np.argmax(cnnlab.load_run(str(workdir)).predict(images), -1)
  np.testing.assert_array_equal(matrix, np.histogram2d(labels, predicted, bins=10,
                                                       range=[[0, 10], [0, 10]])[0])
  capsys.readouterr()

  assert cli.main(['report', str(workdir)]) == 0
  out = capsys.readouterr().out
  assert 'no finished runs' not in out and '# Run report: run' in out
  assert f"accuracy {summary['final_eval']['accuracy']:.4f}" in out
  assert f'| 0 | {matrix[0].sum()} | {100 * matrix[0, 0] / matrix[0].sum():.2f} |' in out
  for name in ('curves.png', 'confusion.png'):
    png = (workdir / 'plots' / name).read_bytes()
    assert png.startswith(b'\x89PNG') and len(png) > 10_000, name
  assert '![curves](plots/curves.png)' in (workdir / 'report.md').read_text()


def test_runs_lists_each_run_with_its_state(tmp_path, data_dir, capsys):
  root = tmp_path / 'runs'
  assert train_cli(root / 'done', data_dir) == 0
  with pytest.raises(loop.NonFiniteError):  # fails at its first log interval
    loop.train_and_evaluate(config_lib.load(QUICKSTART, tiny_args(
        data_dir, 'optim.learning_rate=1e39')), str(root / 'sweep' / 'diverged'))
  (root / 'sweep' / 'queued').mkdir()
  (root / 'sweep' / 'queued' / 'point.json').write_text('{"overrides": {}}')
  shutil.copytree(root / 'done', root / 'sweep' / 'busy')  # a run in progress: its lock held,
  os.remove(root / 'sweep' / 'busy' / 'summary.json')       # no summary yet
  lock = workdir_lib.WorkdirLock(str(root / 'sweep' / 'busy'))
  capsys.readouterr()
  try:
    assert cli.main(['runs', str(root)]) == 0
    table = capsys.readouterr().out.splitlines()
  finally:
    lock.release()
  states = {line.split()[0]: line.split()[1] for line in table[1:]}
  assert states == {'done': 'finished', 'sweep/busy': 'running', 'sweep/diverged': 'failed',
                    'sweep/queued': 'new'}
  done = json.loads((root / 'done' / 'summary.json').read_text())
  [line] = [row for row in table if row.startswith('done ')]
  assert '3/3' in line and f"accuracy {done['final_eval']['accuracy']:.4f}" in line
  [line] = [row for row in table if row.startswith('sweep/diverged')]
  assert '(NonFiniteError: non-finite loss' in line and ' 1/3 ' in line
  assert runs.status(str(root / 'sweep' / 'busy')).state == 'interrupted'  # lock released
  assert cli.main(['runs', str(root), '--state', 'failed']) == 0
  assert [row.split()[0] for row in capsys.readouterr().out.splitlines()[1:]] == ['sweep/diverged']


def test_a_report_over_unrelated_runs_shows_the_keys_that_matter_once(tmp_path, data_dir):
  root = tmp_path / 'root'
  assert train_cli(root / 'a', data_dir, 'train.log_every_steps=1') == 0
  assert train_cli(root / 'b', data_dir, 'train.log_every_steps=3', 'checkpoint.keep=1',
                   'model.filters=(8, 8)') == 0
  paths = report.write(str(root), plots=True)
  header = open(paths['csv']).readline().strip().split(',')
  # log and checkpoint keys are no columns
  assert header == ['model.filters', *report.csv_fields('accuracy')]
  assert '| filters | seeds |' in open(paths['markdown']).read()
  assert report.column_names(['model.name', 'data.name', 'model.kernel_size']) == [
      'model.name', 'data.name', 'kernel_size']
