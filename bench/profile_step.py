"""Where one cnnlab train step spends its time: XLA's own per-operation profile, summed by kind.

  python bench/profile_step.py --model resnet18_cifar                 # fp32, batch 128, CPU
  python bench/profile_step.py --model simple_cnn --dtype bf16 --top 15
  python bench/profile_step.py --model resnet18_cifar --xla-flags=--xla_cpu_use_onednn=true

It builds the same step as bench_train.py's cnnlab rows (the model's experiment with
`cnnlab_overrides`: synthetic data drawn on the device, plain SGD), runs --warmup steps, then
traces --steps steps with `jax.profiler` and reads the trace's per-operation events (on CPU, one
per XLA thunk: a convolution, a dot, a fusion, a copy...). Each operation is classified from the
compiled HLO (`compiled.as_text()`):

  convolution   a convolution (forward, input gradient or kernel gradient, told apart by its
                dimension labels and window), alone or inside a fusion
  dot           a matrix multiplication
  reduction     a fusion or op that reduces (batch-norm statistics, losses, pooling gradients)
  copy          a copy or transpose (layout changes XLA inserted)
  elementwise   any other fusion (activation, normalisation, optimizer updates...)
  other         the rest (collectives, custom calls, control flow)

The printed table gives milliseconds per step per kind and the --top operations.

Read it with two cautions. XLA:CPU runs convolutions asynchronously on its thread pool: their
events time only the launch (a fraction of a millisecond), while the work overlaps the operations
that follow. So the convolutions' real cost is roughly the step's wall time minus the other
operations' sum, printed as "not in events". And the profiler slows the step (compare the wall
time printed with bench_train.py's). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

import bench_train  # noqa: E402  (the model table and the overrides: one definition of the step)

_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*)$')
_COMPUTATION = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+) .*\{\s*$')
_OPCODE = re.compile(r'^(?:\([^=]*?\)|[\w\[\]{},:\s]*?)\s*([\w\-]+)\(')


def parse_hlo(text: str) -> tuple[dict[str, dict], dict[str, list[str]]]:
  """Instructions (name -> {'opcode', 'line'}) and computations (name -> instruction names)."""
  instructions, computations, current = {}, {}, None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m and ' = ' not in line:
      current = m.group(1)
      computations[current] = []
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, rhs = m.groups()
    op = _OPCODE.match(rhs)
    instructions[name] = {'opcode': op.group(1) if op else '?', 'line': line.strip()}
    if current is not None:
      computations[current].append(name)
  return instructions, computations


def _called(line: str) -> list[str]:
  return re.findall(r'(?:calls|to_apply|body|condition)=%?([\w.\-]+)', line)


def _conv_part(line: str) -> str:
  """Forward, input gradient or kernel gradient of a convolution, from its HLO line.

  Backward convolutions carry 'transpose(' in their op_name. Of those, the kernel gradient slides
  a window as large as the activations and outputs a kernel-sized map, so its window is larger
  than its output's spatial size; the input gradient slides a kernel-sized window.
  """
  if 'transpose(' not in line:
    return 'convolution fwd'
  window = re.search(r'window=\{size=([\dx]+)', line)
  labels = re.search(r'dim_labels=\w+_\w+->(\w+)', line)
  shape = re.search(r'= \w+\[([\d,]+)\]', line)
  if not (window and labels and shape):
    return 'convolution bwd'
  window = [int(v) for v in window.group(1).split('x')]
  dims = [int(v) for v in shape.group(1).split(',')]
  spatial = [dims[labels.group(1).index(str(i))] for i in range(len(window))]
  return 'convolution dw' if sum(window) > sum(spatial) else 'convolution dx'


def classify(name: str, instructions: dict, computations: dict) -> str:
  """The kind of one traced operation (see the module docstring)."""
  info = instructions.get(name)
  if info is None:
    return 'other'
  opcodes, lines, todo, seen = [info['opcode']], [info['line']], _called(info['line']), set()
  while todo:  # the operations inside fusions and called computations
    comp = todo.pop()
    if comp in seen:
      continue
    seen.add(comp)
    for inner in computations.get(comp, ()):
      opcodes.append(instructions[inner]['opcode'])
      lines.append(instructions[inner]['line'])
      todo.extend(_called(instructions[inner]['line']))
  if 'convolution' in opcodes:
    return _conv_part(lines[opcodes.index('convolution')])
  if 'dot' in opcodes:
    return 'dot'
  if any(op in ('reduce', 'reduce-window', 'select-and-scatter', 'scatter') for op in opcodes):
    return 'reduction'
  if info['opcode'] in ('copy', 'transpose') or (
      info['opcode'] == 'fusion' and set(opcodes[1:]) <= {'parameter', 'copy', 'transpose',
                                                          'bitcast', 'reshape'}):
    return 'copy'
  if info['opcode'] == 'fusion':
    return 'elementwise'
  return 'other'


def shape_of(line: str) -> str:
  m = re.match(r'[\w.\-%]+ = (\S+?\[[\d,]*\])', line.replace('ROOT ', ''))
  return m.group(1) if m else ''


def trace_events(trace_dir: str) -> list[dict]:
  """Complete ('X') events of the perfetto trace jax.profiler wrote under trace_dir."""
  paths = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)
  if not paths:
    raise SystemExit(f'no perfetto_trace.json.gz under {trace_dir}: did the profiler run?')
  with gzip.open(max(paths, key=os.path.getmtime), 'rt', encoding='utf-8') as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  return [e for e in events if e.get('ph') == 'X' and 'dur' in e]


def summarise(events: list[dict], instructions: dict, computations: dict, steps: int) -> dict:
  per_op = collections.defaultdict(float)  # microseconds over all traced steps
  for e in events:
    if e['name'] in instructions:
      per_op[e['name']] += float(e['dur'])
  kinds = collections.defaultdict(float)
  for name, us in per_op.items():
    kinds[classify(name, instructions, computations)] += us
  ms = lambda us: us / 1e3 / steps  # noqa: E731
  return {'kinds_ms': {k: ms(v) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
          'ops_ms': {n: ms(v) for n, v in sorted(per_op.items(), key=lambda kv: -kv[1])},
          'total_ms': ms(sum(per_op.values()))}


def build_step(model: str, dtype: str, batch: int | None):
  """cnnlab's compiled train step for a bench_train model, its state and its data argument."""
  from cnnlab import config as config_lib, parallel
  arch = bench_train.MODELS[model]
  batch = batch or arch.batch_cpu
  overrides = bench_train.cnnlab_overrides(arch, dtype=dtype, batch=batch, steps=1000,
                                           cpu_devices=1)
  config = config_lib.load(os.path.join(bench_train.ROOT, arch.experiment), overrides)
  parallel.configure_cpu_devices(config.parallel.cpu_devices)
  from cnnlab.train.loop import setup
  run = setup(config)
  state = run.par.place_state(run.initial_state())
  compiled, data_arg = run.compile_train(state)
  return compiled, state, data_arg, batch


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='resnet18_cifar', choices=list(bench_train.MODELS))
  parser.add_argument('--dtype', default='fp32', choices=list(bench_train.DTYPE_ALIASES))
  parser.add_argument('--batch', type=int, default=None, help="default: bench_train's CPU batch")
  parser.add_argument('--steps', type=int, default=5, help='traced steps')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--top', type=int, default=12, help='operations listed one by one')
  parser.add_argument('--xla-flags', default='', help='appended to XLA_FLAGS')
  parser.add_argument('--json', default=None, help='also write the summary here')
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 0:
    raise SystemExit('--steps must be >= 1 and --warmup >= 0')
  from cnnlab import parallel
  os.environ['XLA_FLAGS'] = ' '.join(
      [f for f in os.environ.get('XLA_FLAGS', '').split()
       if not f.startswith('--xla_force_host_platform_device_count')] + args.xla_flags.split())
  parallel.fast_cpu_flags()
  import jax
  compiled, state, data_arg, batch = build_step(args.model, bench_train.DTYPE_ALIASES[args.dtype],
                                                args.batch)
  for _ in range(args.warmup):
    state, metrics = compiled(state, data_arg)
  jax.block_until_ready(state)
  with tempfile.TemporaryDirectory(prefix='cnnlab-profile-') as tmp:
    started = time.perf_counter()
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(args.steps):
        state, metrics = compiled(state, data_arg)
      jax.block_until_ready((state, metrics))
    wall_ms = (time.perf_counter() - started) * 1e3 / args.steps
    events = trace_events(tmp)
  instructions, computations = parse_hlo(compiled.as_text())
  summary = summarise(events, instructions, computations, args.steps)
  if not summary['ops_ms']:
    raise SystemExit('the trace holds no events named after the compiled HLO\'s operations '
                     f'({len(events)} events): this backend\'s profiler names them differently')
  print(f'{args.model} {args.dtype} batch {batch}: {wall_ms:.1f} ms per traced step (wall, '
        f'profiler on), {summary["total_ms"]:.1f} ms in operations; {jax.default_backend()}, '
        f'load average {os.getloadavg()[0]:.2f}')
  print(f'\n{"kind":18s} {"ms/step":>9s} {"share":>6s}')
  for kind, ms in summary['kinds_ms'].items():
    print(f'{kind:18s} {ms:9.1f} {ms / summary["total_ms"]:6.1%}')
  print(f'{"not in events":18s} {wall_ms - summary["total_ms"]:9.1f}  (wall minus the operations: '
        'asynchronous convolutions, waits, profiler)')
  print(f'\n{"operation":28s} {"kind":16s} {"ms/step":>8s}  shape')
  for name, ms in list(summary['ops_ms'].items())[:args.top]:
    line = instructions[name]['line']
    print(f'{name:28s} {classify(name, instructions, computations):16s} {ms:8.2f}  '
          f'{shape_of(line)}')
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump({'model': args.model, 'dtype': args.dtype, 'batch': batch, 'wall_ms': wall_ms,
                 'xla_flags': os.environ.get('XLA_FLAGS', ''), **summary}, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
