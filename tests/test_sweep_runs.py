"""A real sweep of tiny runs (conv_stack on 8x8 digits), killed mid-way and relaunched: finished
runs are not redone, the interrupted one resumes from its checkpoint, the failing point is recorded
while the others finish, and the report's numbers are the runs' summary.json."""

import csv
import json
import os
import subprocess
import sys
import time

import pytest

from cnnlab import cli, data
from cnnlab.sweeps import plan as sweep
from conftest import session_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, 'experiments')

STEPS = 300  # long enough to kill the second run while it trains (steps are ~ms each)
POINTS = [{'model.kernel_size': 3, 'seed': 0}, {'model.kernel_size': 3, 'seed': 1},
          {'model.kernel_size': 0, 'seed': 0},  # fails: validation rejects the model
          {'model.kernel_size': 5, 'seed': 0}]


def wait_for(predicate, what, timeout=300):
  deadline = time.time() + timeout
  while not predicate():
    if time.time() > deadline:
      raise AssertionError(f'timed out waiting for {what}')
    time.sleep(0.05)


def has_train_record(directory):
  try:
    return '"train"' in open(os.path.join(directory, 'metrics.jsonl')).read()
  except OSError:
    return False


@pytest.fixture(scope='module')
def sweep_root(shared_root):
  """The sweep, run once per test run whichever xdist worker comes first; the others read what
  it recorded."""
  with session_lock(shared_root, 'sweep') as tmp:
    record = tmp / 'fixture.json'
    if not record.exists():
      tmp.mkdir()
      result = _run_sweep(tmp)
      record.write_text(json.dumps(result))
    result = json.loads(record.read_text())
  config_file, root, overrides = result['plan']
  return {**result, 'points': sweep.plan(config_file, root, overrides),
          'relaunch': subprocess.CompletedProcess([], result['returncode'], result['stdout'],
                                                  result['stderr'])}


def _run_sweep(tmp):
  data_dir = str(tmp / 'data')
  data.prepare('digits', data_dir)
  config = tmp / 'exp.py'
  config.write_text(f'''
from cnnlab.configs import base

def get_config():
  c = base.get_config()
  c.model.name = 'conv_stack'
  c.model.filters = (8, 16)
  c.model.kernel_size = 3
  c.data.name = 'digits'
  c.train.batch_size = 32
  c.train.num_steps = {STEPS}
  c.train.log_every_steps = 1
  c.train.eval_every_steps = {STEPS // 2}
  c.optim.schedule = 'constant'
  c.optim.learning_rate = 0.05
  c.log.tensorboard = False
  return c

def get_sweep():
  return {POINTS!r}
''')
  root = str(tmp / 'root')
  overrides = [f'data.data_dir={data_dir}', 'compilation_cache_dir=']
  command = [sys.executable, '-m', 'cnnlab.cli', 'sweep', '--config', str(config), '--root', root,
             *(f'--config.{o}' for o in overrides)]
  points = sweep.plan(str(config), root, overrides)
  first, second = points[0].directory, points[1].directory

  runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    wait_for(lambda: os.path.exists(os.path.join(first, 'summary.json')), 'the first run')
    wait_for(lambda: has_train_record(second), 'the second run to train')
  finally:
    runner.kill()  # SIGKILL: no chance to clean up; its child gets SIGTERM from the kernel
    runner.wait()
  finished = {name: os.stat(os.path.join(first, name)).st_mtime_ns
              for name in ('summary.json', 'metrics.jsonl', 'config.json')}

  relaunch = subprocess.run([*command, '--workers', '2'], capture_output=True, text=True,
                            timeout=600)
  return {'root': root, 'plan': [str(config), root, overrides], 'finished_mtimes': finished,
          'returncode': relaunch.returncode, 'stdout': relaunch.stdout, 'stderr': relaunch.stderr}


def check_relaunch_completes_without_redoing_finished_runs(sweep_root):
  first, second, _, fourth = sweep_root['points']
  out = sweep_root['relaunch'].stdout
  assert f'[start] {first.name}' not in out and 'skipped' in out
  for name, mtime in sweep_root['finished_mtimes'].items():
    assert os.stat(os.path.join(first.directory, name)).st_mtime_ns == mtime, name
  for point in (first, second, fourth):
    summary = json.load(open(os.path.join(point.directory, 'summary.json')))
    assert summary['final_eval']['step'] == STEPS
  # The second run was stopped while training: it saved a checkpoint and the relaunch resumed it.
  resumed = json.load(open(os.path.join(second.directory, 'summary.json')))
  assert 0 < resumed['launches'][-1]['start_step'] < STEPS
  record = json.load(open(os.path.join(sweep_root['root'], 'sweep.json')))
  assert [s['done'] for s in record['sessions']] == [2]  # the killed launch recorded nothing
  assert [p['name'] for p in record['points']] == [p.name for p in sweep_root['points']]


def check_a_failing_point_is_recorded_and_the_others_finish(sweep_root):
  failing = sweep_root['points'][2]
  relaunch = sweep_root['relaunch']
  assert relaunch.returncode == 1
  assert f'FAILED {failing.name}: cnnlab train: error: invalid config' in relaunch.stderr
  error = json.load(open(os.path.join(failing.directory, 'error.json')))
  assert 'kernel_size must be a positive integer' in error['error']
  assert error['returncode'] == 2 and os.path.exists(error['log'])
  assert 'kernel_size must be a positive integer' in open(error['log']).read()
  assert sweep.state(failing) == 'failed'
  assert '2 done, 1 finished before, 1 failed' in relaunch.stdout


def check_report_numbers_are_the_runs_summaries(sweep_root, capsys):
  root = sweep_root['root']
  assert cli.main(['report', root]) == 0
  rows = list(csv.DictReader(open(os.path.join(root, 'results.csv'))))
  assert [(r['model.kernel_size'], r['seeds']) for r in rows] == [('3', '2'), ('5', '1')]
  summaries = [json.load(open(os.path.join(p.directory, 'summary.json')))
               for p in sweep_root['points'] if p.overrides['model.kernel_size'] == 3]
  accuracies = [s['final_eval']['accuracy'] for s in summaries]
  losses = [s['final_eval']['loss'] for s in summaries]
  assert float(rows[0]['accuracy_mean']) == pytest.approx(sum(accuracies) / 2, abs=1e-12)
  assert float(rows[0]['loss_mean']) == pytest.approx(sum(losses) / 2, abs=1e-12)
  assert float(rows[0]['accuracy_std']) == pytest.approx(abs(accuracies[0] - accuracies[1]) / 2 ** 0.5)
  assert int(rows[0]['params']) == summaries[0]['num_params']
  assert float(rows[0]['wall_time_s']) == pytest.approx(sum(s['wall_time_s'] for s in summaries) / 2)
  assert rows[0]['runs'] == 'kernel_size=3,seed=0 kernel_size=3,seed=1'
  markdown = open(os.path.join(root, 'report.md')).read()
  assert 'cnnlab sweep --config' in markdown and '2 configurations, 3 finished runs, 1 failed' in markdown
  assert capsys.readouterr().out.startswith('# Sweep report')
  plots = [os.path.join(root, 'plots', 'accuracy_vs_kernel_size.png'),
           os.path.join(root, 'plots', 'curves', 'kernel_size=3.png'),
           os.path.join(root, 'plots', 'curves', 'kernel_size=5.png')]
  for path in plots:
    assert open(path, 'rb').read(8) == b'\x89PNG\r\n\x1a\n' and os.path.getsize(path) > 5000


def test_a_killed_sweep_relaunched_finishes_records_failures_and_reports(sweep_root, capsys):
  """One test over the one sweep (a worker that waited for another's sweep would sit idle)."""
  check_relaunch_completes_without_redoing_finished_runs(sweep_root)
  check_a_failing_point_is_recorded_and_the_others_finish(sweep_root)
  check_report_numbers_are_the_runs_summaries(sweep_root, capsys)
