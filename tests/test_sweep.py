"""Sweeps without training: expansion helpers, run names, planning errors, refusing a foreign run
directory, the report's arithmetic on hand-written runs, and the launch scripts (bash -n, dry run)."""

import csv
import json
import os
import subprocess

import pytest

from cnnlab import cli, runs, workdir
from cnnlab.sweeps import plan as sweep, report, runner as sweep_runner
from cnnlab.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, 'experiments')
ABLATION = os.path.join(EXPERIMENTS, 'ablation_kernel_stride_pool.py')
LAUNCH = os.path.join(ROOT, 'launch')


def write_config(tmp_path, sweep_body='return []'):
  """A conv_stack experiment on digits with the given get_sweep() body."""
  path = tmp_path / 'exp.py'
  path.write_text(f'''
from cnnlab.configs import base
from cnnlab import sweeps as sweep

def get_config():
  c = base.get_config()
  c.model.name = 'conv_stack'
  c.model.filters = (8, 16)
  c.model.kernel_size = 3
  c.model.pool = 'max'
  c.data.name = 'digits'
  c.train.batch_size = 32
  c.train.num_steps = 2
  return c

def get_sweep():
  {sweep_body}
''')
  return str(path)


# ---- definitions and names ----

def test_grid_zip_product_and_seeds():
  g = sweep.grid({'a': [1, 2], 'b': ['x', 'y', 'z']})
  assert len(g) == 6 and g[0] == {'a': 1, 'b': 'x'} and g[1] == {'a': 1, 'b': 'y'}  # last fastest
  assert sweep.zipped({'a': [1, 2], 'b': [3, 4]}) == [{'a': 1, 'b': 3}, {'a': 2, 'b': 4}]
  with pytest.raises(ConfigError, match='equal length'):
    sweep.zipped({'a': [1, 2], 'b': [3]})
  p = sweep.product(sweep.grid({'a': [1, 2]}), sweep.zipped({'b': [3, 4], 'c': [5, 6]}))
  assert p == [{'a': 1, 'b': 3, 'c': 5}, {'a': 1, 'b': 4, 'c': 6}, {'a': 2, 'b': 3, 'c': 5},
               {'a': 2, 'b': 4, 'c': 6}]
  with pytest.raises(ConfigError, match=r"both set \['a'\]"):
    sweep.product(sweep.grid({'a': [1]}), sweep.grid({'a': [2]}))
  s = sweep.with_seeds(sweep.grid({'a': [1, 2]}), 3)
  assert [(x['a'], x['seed']) for x in s] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
  assert list(s[0]) == ['a', 'seed']  # the seed comes last in names
  assert [x['seed'] for x in sweep.with_seeds([{}], [7, 9])] == [7, 9]
  with pytest.raises(ConfigError, match="axis 'a' needs a non-empty list"):
    sweep.grid({'a': 'abc'})


def test_run_names_are_readable_and_stable():
  assert sweep.run_name({'model.kernel_size': 5, 'model.stride': 2, 'model.pool': 'max',
                         'seed': 1}) == 'kernel_size=5,stride=2,pool=max,seed=1'
  assert sweep.run_name({'model.filters': (16, 32), 'optim.learning_rate': 0.001}) == \
      'filters=16-32,learning_rate=0.001'
  assert sweep.run_name({'model.dropout': 0.1, 'data.dropout': 0.2}) == \
      'model.dropout=0.1,data.dropout=0.2'  # same last component: the full keys
  assert sweep.run_name({}) == 'default'
  # Characters that cannot go in a name are replaced, and a hash of the point keeps it unique.
  # The hash is sha1 of the point, the same in every process and Python version.
  escaping = sweep.run_name({'model.pool': '../../etc'})
  assert escaping == 'pool=.._.._etc,54aacf11' and '/' not in escaping
  assert sweep.run_name({'model.pool': '../../etc'}) == escaping
  assert sweep.run_name({'model.pool': '.._.._etc'}) == 'pool=.._.._etc' != escaping
  long = sweep.run_name({f'k{i}': 'v' * 20 for i in range(10)})
  assert len(long) <= 120 and long != sweep.run_name({f'k{i}': 'v' * 20 for i in range(11)})


def test_plan_of_the_shipped_ablation():
  points = sweep.plan(ABLATION, '/tmp/runs')
  assert len(points) == 54
  assert points[0].name == 'kernel_size=3,stride=1,pool=max,seed=0'
  assert points[-1].name == 'kernel_size=7,stride=2,pool=none,seed=2'
  assert points[17].directory == '/tmp/runs/kernel_size=3,stride=2,pool=none,seed=2'
  assert points[17].config['model']['stride'] == 2 and points[17].config['model']['pool'] == 'none'
  assert points[0].command()[:6] == ['cnnlab', 'train', '--config', ABLATION, '--workdir',
                                     points[0].directory]
  assert [p.name for p in sweep.select(points, '2-4,0')] == [points[i].name for i in (2, 3, 4, 0)]
  with pytest.raises(ConfigError, match='points 0..53'):
    sweep.select(points, '54')
  shapes = sweep.plan(os.path.join(EXPERIMENTS, 'ablation_kernel_stride_pool_shapes.py'), '/tmp/s')
  assert [p.name for p in shapes] == [p.name for p in points]
  assert shapes[0].config['data']['name'] == 'shapes'


def test_slurm_requeues_on_the_preemption_code():
  text = open(os.path.join(LAUNCH, 'slurm.sbatch')).read()
  assert f'REQUEUE_EXIT_CODE={workdir.EXIT_PREEMPTED} ' in text


# ---- bad input: fails before any run starts ----

def test_unknown_sweep_key_fails_before_anything_runs(tmp_path, capsys):
  config = write_config(tmp_path, "return sweep.grid({'model.kernel_sise': [3, 5]})")
  root = tmp_path / 'root'
  assert cli.main(['sweep', '--config', config, '--root', str(root)]) == 2
  err = capsys.readouterr().err
  assert "unknown config key 'model.kernel_sise'" in err and "Did you mean 'model.kernel_size'" in err
  assert not root.exists()
  # A misspelt override for every point, and one that would overwrite a swept key.
  config = write_config(tmp_path, "return sweep.grid({'model.kernel_size': [3, 5]})")
  assert cli.main(['sweep', '--config', config, '--root', str(root), '--config.train.num_stepz=1']) == 2
  assert "'train.num_steps'" in capsys.readouterr().err
  assert cli.main(['sweep', '--config', config, '--root', str(root), '--config.model.kernel_size=7']) == 2
  assert 'model.kernel_size is swept' in capsys.readouterr().err
  assert not root.exists()


def test_wrong_type_and_duplicate_points_are_rejected(tmp_path):
  config = write_config(tmp_path)
  with pytest.raises(ConfigError, match=r"sweep point 1 .*train.batch_size='big': expected int"):
    sweep.plan(config, str(tmp_path), points=[{'train.batch_size': 8}, {'train.batch_size': 'big'}])
  with pytest.raises(ConfigError, match='sweep points 0 and 2 are the same run'):
    sweep.plan(config, str(tmp_path), points=[{'model.kernel_size': 3}, {'model.kernel_size': 5},
                                              {'model.kernel_size': 3}])
  # Spelt differently, still the same run: 3 is the default, 0.05 == 5e-2.
  with pytest.raises(ConfigError, match='sweep points 0 and 1 are the same run'):
    sweep.plan(config, str(tmp_path), points=[{}, {'model.kernel_size': 3}])
  with pytest.raises(ConfigError, match='sweep points 0 and 1 are the same run'):
    sweep.plan(config, str(tmp_path), points=[{'optim.learning_rate': 0.05},
                                              {'optim.learning_rate': 5e-2, 'seed': 0}])
  with pytest.raises(ConfigError, match='defines no get_sweep'):
    sweep.plan(os.path.join(EXPERIMENTS, 'quickstart.py'), str(tmp_path))
  with pytest.raises(ConfigError, match='non-empty list'):
    sweep.plan(config, str(tmp_path))  # get_sweep() returns []


def test_values_round_trip_through_the_command_line(tmp_path):
  config = write_config(tmp_path)
  points = sweep.plan(config, str(tmp_path), points=[
      {'model.filters': (4, 8), 'model.pool': 'None', 'optim.learning_rate': float('inf')}])
  assert points[0].config['model']['pool'] == 'None'  # the string, not None
  assert points[0].config['optim']['learning_rate'] == float('inf')
  assert "model.pool='None'" in points[0].args and 'optim.learning_rate=1e999' in points[0].args


def test_a_directory_holding_another_config_is_refused_untouched(tmp_path):
  config = write_config(tmp_path)
  root = str(tmp_path / 'root')
  [point] = sweep.plan(config, root, points=[{'model.kernel_size': 5}])
  stored = json.loads(json.dumps(point.config))
  stored['model']['kernel_size'] = 7  # e.g. the experiment file was edited since
  os.makedirs(point.directory)
  with open(os.path.join(point.directory, 'config.json'), 'w') as f:
    json.dump(stored, f)
  open(os.path.join(point.directory, 'summary.json'), 'w').write('{}')
  before = sorted(os.listdir(point.directory))
  assert sweep.state(point) == 'mismatch'
  assert 'model.kernel_size: stored 7, expected 5' in sweep.mismatch(point)
  [outcome] = sweep_runner.run([point], root, log=lambda line: None)
  assert outcome.status == 'failed' and 'holds a run of another config' in outcome.message
  assert sorted(os.listdir(point.directory)) == before  # nothing written, nothing run
  assert sweep_runner.exit_code([outcome]) == 1
  # Keys that do not change what a run computes may differ.
  stored['model']['kernel_size'] = 5
  stored['log']['progress'], stored['data']['data_dir'] = 'none', '/elsewhere'
  with open(os.path.join(point.directory, 'config.json'), 'w') as f:
    json.dump(stored, f)
  assert sweep.mismatch(point) is None and sweep.state(point) == 'finished'


def test_dry_run_prints_points_and_directories(tmp_path, capsys):
  root = tmp_path / 'root'
  assert cli.main(['sweep', '--config', ABLATION, '--root', str(root), '--dry-run',
                   '--config.train.num_epochs=1']) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0] == f'54 points under {root} (54 new); each runs'
  assert '--config.train.num_epochs=1 --config.KEY=VALUE' in out[1]
  assert out[2].split() == ['0', 'new', 'kernel_size=3,stride=1,pool=max,seed=0',
                            'model.kernel_size=3', 'model.stride=1', "model.pool='max'", 'seed=0']
  assert len(out) == 56 and not root.exists()
  assert cli.main(['sweep', '--config', ABLATION, '--root', str(root), '--count']) == 0
  assert capsys.readouterr().out == '54\n'


def test_cpu_slots_and_xla_flags():
  slots = sweep_runner.cpu_slots(2)
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) >= 2:
    assert not set(slots[0]) & set(slots[1]) and len(slots[0]) == len(cores) // 2
  assert [len(s) for s in sweep_runner.cpu_slots(len(cores) + 1)] == [1] * (len(cores) + 1)
  assert sweep_runner.xla_flags('--xla_foo=1 --xla_force_host_platform_device_count=8', 2) == \
      '--xla_foo=1 --xla_force_host_platform_device_count=2'


# ---- report arithmetic on hand-written runs ----

def fake_run(root, overrides, accuracy, loss, wall, config):
  name = sweep.run_name(overrides)
  path = os.path.join(root, name)
  os.makedirs(path)
  json.dump({'overrides': overrides, 'name': name}, open(os.path.join(path, 'point.json'), 'w'))
  json.dump(config, open(os.path.join(path, 'config.json'), 'w'))
  json.dump({'final_eval': {'accuracy': accuracy, 'loss': loss, 'step': 4}, 'num_params': 100,
             'wall_time_s': wall, 'images_per_sec': 1000.0}, open(os.path.join(path, 'summary.json'), 'w'))
  with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
    for step in (1, 2):
      f.write(json.dumps({'kind': 'train', 'step': step, 'loss': 2.0 / step}) + '\n')
    f.write(json.dumps({'kind': 'eval', 'step': 2, 'loss': loss, 'accuracy': accuracy}) + '\n')
    f.write('{"kind": "train", "st')  # a line cut short by a killed process


def test_report_aggregates_seeds_exactly(tmp_path):
  [point] = sweep.plan(write_config(tmp_path), '/x', [f'data.data_dir={tmp_path / "data"}'],
                       points=[{}])
  root = str(tmp_path / 'root')
  accuracies = {(3, 'max'): [0.90, 0.92, 0.97], (3, 'avg'): [0.80], (5, 'max'): [0.5, 0.7]}
  for (kernel, pool), values in accuracies.items():
    for seed, acc in enumerate(values):
      fake_run(root, {'model.kernel_size': kernel, 'model.pool': pool, 'seed': seed}, acc,
               1 - acc, 10.0 + seed, point.config)
  # A failed run and an unfinished one are listed, not aggregated.
  os.makedirs(os.path.join(root, 'kernel_size=7,pool=max,seed=0'))
  json.dump({'overrides': {'model.kernel_size': 7, 'model.pool': 'max', 'seed': 0}},
            open(os.path.join(root, 'kernel_size=7,pool=max,seed=0', 'point.json'), 'w'))
  json.dump({'error': 'ValueError: boom'},
            open(os.path.join(root, 'kernel_size=7,pool=max,seed=0', 'error.json'), 'w'))
  paths = report.write(root)
  rows = list(csv.DictReader(open(paths['csv'])))
  assert [(r['model.kernel_size'], r['model.pool'], r['seeds']) for r in rows] == [
      ('3', 'avg', '1'), ('3', 'max', '3'), ('5', 'max', '2')]  # directory order without sweep.json
  by_key = {(int(r['model.kernel_size']), r['model.pool']): r for r in rows}
  assert float(by_key[3, 'max']['accuracy_mean']) == pytest.approx(0.93)
  assert float(by_key[3, 'max']['accuracy_std']) == pytest.approx(0.0360555, rel=1e-5)  # ddof=1
  assert float(by_key[5, 'max']['loss_std']) == pytest.approx(0.1414214, rel=1e-5)
  assert by_key[3, 'avg']['accuracy_std'] == ''  # one seed: no spread
  assert float(by_key[3, 'max']['wall_time_s']) == pytest.approx(11.0)
  # MACs and the receptive field come from the model: conv_stack (8, 16) on 8x8 digits.
  assert int(by_key[3, 'max']['macs']) > 0 and by_key[3, 'max']['receptive_field'] == '10'
  text = open(paths['markdown']).read()
  assert '| 3 | max | 3 | **93.00 ± 3.61** |' in text and '| 3 | avg | 1 | 80.00 |' in text
  assert '`kernel_size=7,pool=max,seed=0`: ValueError: boom' in text
  names = sorted(os.path.relpath(p, root) for p in paths['plots'])
  assert names == ['plots/accuracy_vs_kernel_size.png', 'plots/accuracy_vs_pool.png',
                   'plots/curves/kernel_size=3,pool=avg.png', 'plots/curves/kernel_size=3,pool=max.png',
                   'plots/curves/kernel_size=5,pool=max.png']
  for path in paths['plots']:
    assert open(path, 'rb').read(8) == b'\x89PNG\r\n\x1a\n' and os.path.getsize(path) > 5000
  assert runs.read_metrics(os.path.join(root, 'kernel_size=3,pool=avg,seed=0'))[-1]['kind'] == 'eval'


# ---- launch scripts ----

def test_launch_scripts_parse_and_dry_run():
  scripts = sorted(os.listdir(LAUNCH))
  assert {'local.sh', 'multiprocess.sh', 'slurm.sbatch', 'tpu_pod.sh'} <= set(scripts)
  for name in scripts:
    if name.endswith(('.sh', '.sbatch')):
      subprocess.run(['bash', '-n', os.path.join(LAUNCH, name)], check=True)

  def dry(script, *args, **env):
    result = subprocess.run(['bash', os.path.join(LAUNCH, script), *args], capture_output=True,
                            text=True, env={'PATH': os.environ['PATH'], 'DRY_RUN': '1', **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()

  out = dry('slurm.sbatch', '--config.train.num_epochs=1', SLURM_ARRAY_JOB_ID='7',
            SLURM_ARRAY_TASK_ID='3', CONFIG='experiments/ablation_kernel_stride_pool.py',
            ROOT='runs/ablation', CNNLAB='cnnlab')
  assert out == ['srun --ntasks=1 cnnlab sweep --config experiments/ablation_kernel_stride_pool.py '
                 '--root runs/ablation --index 3 --config.train.num_epochs=1 ',
                 '# on exit 75: scontrol requeue 7_3']
  out = dry('slurm.sbatch', MODE='train', SLURM_JOB_ID='9', CONFIG='e.py', WORKDIR='/shared/r')
  assert out == ['srun cnnlab train --config e.py --workdir /shared/r ',
                 '# on exit 75: scontrol requeue 9']
  out = dry('tpu_pod.sh', 'train', '--config', 'e.py', '--workdir', '/mnt/r', TPU='pod',
            ZONE='us-central2-b')
  assert out == ["gcloud compute tpus tpu-vm ssh pod --zone us-central2-b --worker=all --command "
                 "cd\\ ~/cnnlab\\ \\&\\&\\ .venv/bin/cnnlab\\ train\\ --config\\ e.py\\ "
                 "--workdir\\ /mnt/r "]
  out = dry('multiprocess.sh', '2', 'e.py', '/tmp/mp', CNNLAB='cnnlab', PORT='1234',
            DEVICES_PER_PROCESS='3')
  assert out[1] == ('env XLA_FLAGS=--xla_force_host_platform_device_count=3 cnnlab train --config '
                    'e.py --workdir /tmp/mp --coordinator 127.0.0.1:1234 --num-processes 2 '
                    '--process-id 1 > /tmp/mp/process_1.log 2>&1 &')
  assert out == [out[0], out[1], 'wait'] and '--process-id 0 &' in out[0]
  assert dry('local.sh', 'e.py', 'runs/x', '--config.seed=1', CNNLAB='cnnlab') == [
      'cnnlab train --config e.py --workdir runs/x --config.seed=1 ']
  missing = subprocess.run(['bash', os.path.join(LAUNCH, 'slurm.sbatch')], capture_output=True,
                           text=True, env={'PATH': os.environ['PATH'], 'DRY_RUN': '1'})
  assert missing.returncode != 0 and 'CONFIG' in missing.stderr
