"""Runs a sweep's points (cnnlab.sweeps.plan) as training child processes, N at a time.

Each child is pinned to its share of the cores and sees as many XLA CPU devices, so N workers do
not oversubscribe the machine. Finished runs (summary.json) are skipped; interrupted ones resume
from their checkpoints (the train command does that); a failing one is recorded in its directory
(error.json, run.log) while the others go on. A child dies with its runner (SIGTERM, so it saves a
checkpoint first), and a relaunch waits for any run still holding its directory's lock. The root's
sweep.json records the command, the points and every launch.

Like cnnlab.sweeps.plan, this module does not import JAX; each child runs
`cnnlab.train.launch`, as `cnnlab train` does.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

from cnnlab import workdir
from cnnlab.sweeps import plan as sweep
from cnnlab.sweeps.plan import Point


@dataclasses.dataclass
class Outcome:
  point: Point
  status: str  # 'done' | 'skipped' | 'failed' | 'interrupted'
  message: str = ''
  seconds: float = 0.0


@dataclasses.dataclass
class _Job:
  point: Point
  process: subprocess.Popen
  log: Any
  started: float


def cpu_slots(workers: int) -> list[list[int]]:
  """The cores each worker is pinned to: disjoint equal shares (one core each if too few)."""
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else []
  if not cores:
    return [[] for _ in range(workers)]
  if workers > len(cores):
    return [[cores[i % len(cores)]] for i in range(workers)]
  share = len(cores) // workers
  return [cores[i * share:(i + 1) * share] for i in range(workers)]


def xla_flags(flags: str, devices: int) -> str:
  """XLA_FLAGS with the host platform split into `devices` CPU devices (replacing any count)."""
  kept = [f for f in flags.split() if not f.startswith('--xla_force_host_platform_device_count')]
  return ' '.join([*kept, f'--xla_force_host_platform_device_count={devices}'])


def run(points: Sequence[Point], root: str, *, workers: int = 1,
        log: Callable[[str], None] | None = None, argv: Sequence[str] | None = None) -> list[Outcome]:
  """Runs the points not finished yet, `workers` at a time; returns one Outcome per point.

  SIGTERM or SIGINT stops the runner: its running children get SIGTERM (they checkpoint and exit
  with workdir.EXIT_PREEMPTED), no new run starts, and those runs come back as 'interrupted'.
  """
  if workers < 1:
    raise ValueError(f'--workers {workers}: expected at least 1')
  log = log or (lambda line: print(line, flush=True))  # progress shows up in a redirected log too
  os.makedirs(root, exist_ok=True)
  started = time.time()
  _record(root, points, argv, None)
  outcomes: dict[int, Outcome] = {}
  queue = collections.deque(points)
  slots, free = cpu_slots(workers), list(range(workers))
  running: dict[int, _Job] = {}
  stop: list[int] = []

  def on_signal(signum, frame):
    if not stop:
      log(f'sweep: {signal.Signals(signum).name}: stopping the running runs (they checkpoint); '
          'relaunch the same command to continue')
    stop.append(signum)
    for job in running.values():
      if job.process.poll() is None:
        job.process.send_signal(signal.SIGTERM)

  previous = {}
  if threading.current_thread() is threading.main_thread():
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  total, done_count = len(points), 0
  try:
    while (queue and not stop) or running:
      blocked = 0
      while queue and free and not stop and blocked < len(queue):
        point = queue.popleft()
        outcome, job = _start(point, slots[free[-1]], log)
        if outcome is None and job is None:  # another process is writing this run: later
          queue.append(point)
          blocked += 1
          continue
        if outcome is not None:
          outcomes[point.index] = outcome
          done_count += 1
          log(f'[{done_count}/{total}] {_label(outcome)} {point.name}: {outcome.message}')
          continue
        running[free.pop()] = job
        log(f'[start] {point.name}')
      for slot, job in list(running.items()):
        code = job.process.poll()
        if code is None:
          continue
        del running[slot]
        free.append(slot)
        outcome = _finish(job, code, bool(stop))
        outcomes[job.point.index] = outcome
        done_count += 1
        log(f'[{done_count}/{total}] {_label(outcome)} {job.point.name}: {outcome.message} '
            f'({outcome.seconds:.1f} s)')
      if running or queue:
        time.sleep(0.2 if running or not blocked else 1.0)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  for point in points:
    if point.index not in outcomes:
      outcomes[point.index] = Outcome(point, 'interrupted', 'not started')
  result = [outcomes[p.index] for p in points]
  _record(root, points, argv, {
      'started': started, 'wall_time_s': time.time() - started, 'workers': workers,
      **{s: sum(o.status == s for o in result) for s in ('done', 'skipped', 'failed', 'interrupted')},
      'stopped_by': signal.Signals(stop[0]).name if stop else None})
  return result


def conclude(outcomes: Sequence[Outcome], root: str) -> int:
  """Prints the sweep's tally (failures on stderr) and returns its exit code."""
  tally = {s: [o for o in outcomes if o.status == s]
           for s in ('done', 'skipped', 'failed', 'interrupted')}
  print(f'sweep: {len(outcomes)} points: {len(tally["done"])} done, {len(tally["skipped"])} '
        f'finished before, {len(tally["failed"])} failed, {len(tally["interrupted"])} interrupted'
        f' -> cnnlab report {root}')
  for o in tally['failed']:
    print(f'  FAILED {o.point.name}: {o.message}', file=sys.stderr)
  if tally['interrupted']:
    print('  relaunch the same command to finish the interrupted runs', file=sys.stderr)
  return exit_code(outcomes)


def _label(outcome: Outcome) -> str:
  return 'FAILED' if outcome.status == 'failed' else outcome.status


def exit_code(outcomes: Sequence[Outcome]) -> int:
  """0: all finished; workdir.EXIT_PREEMPTED: some were interrupted (relaunch); 1: some failed."""
  if any(o.status == 'interrupted' for o in outcomes):
    return workdir.EXIT_PREEMPTED
  return 1 if any(o.status == 'failed' for o in outcomes) else 0


def _start(point: Point, cpus: list[int], log) -> tuple[Outcome | None, _Job | None]:
  """(outcome, None) if the point needs no run, (None, job) once launched, (None, None) while
  another process is training in its directory."""
  if workdir.is_locked(point.directory):
    log(f'[wait] {point.name}: another process is training in it')
    return None, None
  problem = sweep.mismatch(point)
  if problem:
    return Outcome(point, 'failed', problem), None
  if workdir.is_finished(point.directory):
    return Outcome(point, 'skipped', 'finished already'), None
  os.makedirs(point.directory, exist_ok=True)
  with open(os.path.join(point.directory, workdir.POINT), 'w', encoding='utf-8') as f:
    json.dump({'index': point.index, 'name': point.name, 'overrides': point.overrides,
               'config_file': point.config_file, 'args': list(point.args)}, f, indent=1,
              default=repr)
  error_file = os.path.join(point.directory, workdir.ERROR)
  if os.path.exists(error_file):
    os.remove(error_file)
  command = point.command(sys.executable)
  devices = point.config['parallel']['cpu_devices'] or len(cpus) or os.cpu_count() or 1
  env = {**os.environ, 'PYTHONUNBUFFERED': '1',
         'XLA_FLAGS': xla_flags(os.environ.get('XLA_FLAGS', ''), devices)}
  child = [sys.executable, '-m', 'cnnlab.sweeps.runner', str(os.getpid()), ','.join(map(str, cpus)),
           point.config_file, point.directory, *point.args]
  log_file = open(os.path.join(point.directory, workdir.LOG), 'a', encoding='utf-8')
  log_file.write(f'=== {time.strftime("%Y-%m-%d %H:%M:%S")} cnnlab sweep runs: '
                 f'{" ".join(command)}\n')
  log_file.flush()
  process = subprocess.Popen(child, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                             stdin=subprocess.DEVNULL)
  return None, _Job(point, process, log_file, time.time())


def _finish(job: _Job, code: int, stopping: bool) -> Outcome:
  job.log.close()
  seconds = time.time() - job.started
  summary = workdir.read_json(os.path.join(job.point.directory, workdir.SUMMARY))
  if code == 0 and summary is not None:
    metric, value = workdir.headline(summary.get('final_eval'),
                                     (summary.get('headline') or {}).get('metric'))
    return Outcome(job.point, 'done', f'{metric} {float("nan") if value is None else value:.4f}',
                   seconds)
  if code == workdir.EXIT_PREEMPTED or (stopping and code != 0):
    return Outcome(job.point, 'interrupted', f'stopped (exit {code}); relaunch to resume', seconds)
  log_path = os.path.join(job.point.directory, workdir.LOG)
  tail = _tail(log_path)
  message = _error_line(tail) or (f'killed by signal {-code}' if code < 0 else f'exit code {code}')
  with open(os.path.join(job.point.directory, workdir.ERROR), 'w', encoding='utf-8') as f:
    json.dump({'returncode': code, 'error': message, 'log': log_path, 'log_tail': tail,
               'command': job.point.command(), 'time': time.time()}, f, indent=1)
  return Outcome(job.point, 'failed', f'{message} (log: {log_path})', seconds)


def _tail(path: str, lines: int = 30) -> list[str]:
  with open(path, encoding='utf-8', errors='replace') as f:
    return [line.rstrip('\n') for line in collections.deque(f, maxlen=lines)]


def _error_line(tail: Sequence[str]) -> str | None:
  """The error of a log: `cnnlab train: error: ...` or a traceback's last line."""
  for i, line in enumerate(tail):
    if line.startswith('cnnlab train: error:'):  # train.ERROR_PREFIX
      return ' '.join(s.strip() for s in tail[i:] if s.strip())[:800]
  for line in reversed(tail):
    if re.match(r'^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b', line):
      return line[:800]
  return None


def _record(root: str, points: Sequence[Point], argv, session: dict | None) -> None:
  """ROOT/sweep.json: the command and points of the sweep, and one entry per launch."""
  path = os.path.join(root, sweep.RECORD_FILE)
  with open(os.path.join(root, '.sweep.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    record = workdir.read_json(path) or {'sessions': []}
    if argv is not None:
      record['command'] = ' '.join(['cnnlab', *argv])
    if points:
      record['config_file'] = points[0].config_file
      known = {p['name']: p for p in record.get('points', [])}
      known.update({p.name: {'index': p.index, 'name': p.name, 'overrides': p.overrides}
                    for p in points})
      record['points'] = sorted(known.values(), key=lambda p: p['index'])
    if session is not None:
      record['sessions'].append(session)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      json.dump(record, f, indent=1, default=repr)
    os.replace(path + '.tmp', path)


def _child_main(argv: Sequence[str]) -> int:
  """`python -m cnnlab.sweeps.runner PARENT_PID CPUS CONFIG_FILE WORKDIR [KEY=VALUE ...]`: one
  run of a sweep, as `cnnlab train` runs it.

  Dies with its runner (SIGTERM when the runner exits, so it checkpoints) and stays on its cores.
  """
  parent, cpus, config_file, directory, *overrides = argv
  if sys.platform.startswith('linux'):
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # the runner died before prctl took effect
      return workdir.EXIT_PREEMPTED
  if cpus:
    os.sched_setaffinity(0, {int(c) for c in cpus.split(',')})
  from cnnlab import train
  try:
    summary = train.launch(config_file, directory, overrides)
  except ValueError as e:  # bad input: one clear line (the runner reports it), no traceback
    print(f'{train.ERROR_PREFIX}{e}', file=sys.stderr)
    return 2
  print(train.done_line(summary, directory))
  return 0


if __name__ == '__main__':
  sys.exit(_child_main(sys.argv[1:]))
