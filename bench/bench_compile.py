"""Compile time of a run's two computations: the initial state and the train step.

  python bench/bench_compile.py                                   # GoogLeNet on 32x32 shapes
  python bench/bench_compile.py --experiment resnet20_shapes --set train.batch_size=32

For the experiment (with --set overrides; the persistent compilation cache off), it prints, in
seconds of wall time, one line each:

  init O2     `Run.initial_state`'s computation compiled with XLA's default optimisation
  init O0     the same with xla_backend_optimization_level=0 (what cnnlab uses on CPU: it runs once)
  step        `Run.compile_train` (trace + lower + compile of the train step), and its parts as
              JAX reports them (its jaxpr_trace, jaxpr_to_mlir_module and backend_compile
              duration events, summed)

It also runs on an older checkout (PYTHONPATH=OLD python bench/bench_compile.py), to compare.

No run is trained; compile what you measure on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--experiment', default='googlenet_shapes', help='a file in experiments/')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='config override (default: 32x32 shapes, batch 8)')
  args = parser.parse_args(argv)
  from cnnlab import parallel
  parallel.fast_cpu_flags()
  import jax
  from cnnlab import config as config_lib
  from cnnlab.train import loop, state as state_lib
  overrides = args.set or ['data.shapes.resolution=32', 'train.batch_size=8',
                           'data.shapes.num_train=64', 'data.shapes.num_test=32']
  config = config_lib.load(os.path.join(ROOT, 'experiments', f'{args.experiment}.py'), [
      *overrides, "compilation_cache_dir=''", 'parallel.num_devices=1'])
  run = loop.setup(config)
  create = jax.jit(lambda: state_lib.create(
      run.model, run.settings.tx, seed=config.seed, input_shape=run.info.image_shape,
      ema=config.optim.ema_decay > 0))
  for name, options in (('init O2', None), ('init O0', {'xla_backend_optimization_level': 0})):
    started = time.perf_counter()
    create.lower().compile(compiler_options=options)
    print(f'{name:8s} {time.perf_counter() - started:6.1f} s', flush=True)
  state = run.initial_state()
  parts = {}
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, seconds, **_: parts.__setitem__(event, parts.get(event, 0.0) + seconds))
  started = time.perf_counter()
  train_fn, data_arg = run.compile_train(state)
  if hasattr(train_fn, 'lower'):  # older cnnlab: compile_train returned the jitted step
    train_fn.lower(state, data_arg).compile()
  events = {name: parts.get(f'/jax/core/compile/{event}', 0.0) for name, event in (
      ('trace', 'jaxpr_trace_duration'), ('lower', 'jaxpr_to_mlir_module_duration'),
      ('compile', 'backend_compile_duration'))}
  print(f'{"step":8s} {time.perf_counter() - started:6.1f} s  ('
        + ', '.join(f'{k} {v:.1f} s' for k, v in events.items()) + ')', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
