"""The `cnnlab` console script: `cnnlab <command> ...` (see `cnnlab --help`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence


def _shape(text: str) -> tuple[int, ...]:
  try:
    shape = tuple(int(v) for v in text.replace('x', ',').split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected H,W,C (e.g. 224,224,3), got {text!r}') from None
  if len(shape) != 3 or min(shape) < 1:
    raise argparse.ArgumentTypeError(f'expected three positive sizes H,W,C, got {text!r}')
  return shape


def _import_user_modules(modules: Sequence[str]) -> None:
  """Imports the modules that register a user's models, from the current directory first."""
  from cnnlab import models
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  models.import_modules(modules)


def _summary(args: argparse.Namespace) -> int:
  from cnnlab import analysis, models
  _import_user_modules(args.imports or ())
  overrides = {}
  if args.num_classes is not None:
    overrides['num_classes'] = args.num_classes
  for item in args.set or ():
    key, _, value = item.partition('=')
    try:
      overrides[key] = json.loads(value)
    except json.JSONDecodeError:
      overrides[key] = value
  model = models.create_model(args.model, **overrides)
  shape = args.input_shape or models.get_spec(args.model).input_shape
  summary = analysis.summarize(model, shape, name=args.model)
  print(json.dumps(summary.as_dict(), indent=1) if args.json else summary)
  return 0


def _models(args: argparse.Namespace) -> int:
  from cnnlab import models
  _import_user_modules(args.imports or ())
  for name in models.list_models():
    spec = models.get_spec(name)
    print(f'{name:14s} input {"x".join(map(str, spec.input_shape)):10s} classes {spec.num_classes}')
  return 0


def _split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=value` (or `--config.a.b value`) overrides from the other arguments."""
  rest, overrides = [], []
  argv = list(argv)
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config.'):
      key = arg[len('--config.'):]
      if '=' not in key:
        if i + 1 >= len(argv):
          build_parser().error(f'{arg} needs a value (--config.KEY=VALUE)')  # exits 2
        key, i = f'{key}={argv[i + 1]}', i + 1
      overrides.append(key)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _train(args: argparse.Namespace) -> int:
  from cnnlab import train
  summary = train.launch(args.config, args.workdir, args.overrides, coordinator=args.coordinator,
                         num_processes=args.num_processes, process_id=args.process_id)
  print(train.done_line(summary, args.workdir))
  return 0


def _prepare(args: argparse.Namespace) -> int:
  from cnnlab import data
  path = data.prepare(args.name, args.data_dir)
  print(f'{args.name} is ready in {path}')
  return 0


def _sweep(args: argparse.Namespace) -> int:
  from cnnlab.sweeps import plan, runner
  points = plan.plan(args.config, args.root, args.overrides)
  if args.index is not None:
    points = plan.select(points, args.index)
  if args.count or args.dry_run:
    print(len(points) if args.count else plan.describe(points, args.config, args.root, args.overrides))
    return 0
  argv = ['sweep', '--config', args.config, '--root', args.root, '--workers', str(args.workers),
          *(['--index', args.index] if args.index else []), *(f'--config.{o}' for o in args.overrides)]
  outcomes = runner.run(points, args.root, workers=args.workers, argv=argv)
  return runner.conclude(outcomes, args.root)


def _report(args: argparse.Namespace) -> int:
  from cnnlab import runs
  from cnnlab.sweeps import report
  single = os.path.isdir(args.root) and runs.is_run(args.root)
  write = runs.write_report if single else report.write
  paths = write(args.root, plots=not args.no_plots)
  print(open(paths['markdown'], encoding='utf-8').read())
  for note in paths.get('notes', []):
    print(f'cnnlab report: {note}', file=sys.stderr)
  written = [paths[k] for k in ('csv', 'markdown') if k in paths]
  print(f'wrote {", ".join(written)} and {len(paths["plots"])} plots')
  return 0


def _runs(args: argparse.Namespace) -> int:
  from cnnlab import runs
  found = runs.find(args.root)
  if not found:
    raise ValueError(f'no run directories under {args.root!r}')
  statuses = [runs.status(path) for path in found]
  if args.state:
    statuses = [st for st in statuses if st.state in args.state]
  print(runs.table(statuses, args.root))
  return 0


def build_parser() -> argparse.ArgumentParser:
  from cnnlab.runs import STATES  # no JAX: the parser stays quick to build
  parser = argparse.ArgumentParser(prog='cnnlab', description=__doc__)
  sub = parser.add_subparsers(dest='command', required=True)

  p = sub.add_parser('summary', help='per-layer table: shapes, parameters, MACs, receptive field')
  p.add_argument('--model', required=True, help='a registered model name (see `cnnlab models`)')
  p.add_argument('--input-shape', type=_shape, help='H,W,C (default: the model\'s natural size)')
  p.add_argument('--num-classes', type=int)
  p.add_argument('--set', action='append', metavar='KEY=VALUE',
                 help='model argument override, value parsed as JSON when it can be')
  p.add_argument('--json', action='store_true', help='print the table as JSON')
  p.add_argument('--import', dest='imports', action='append', metavar='MODULE',
                 help='a module registering your own models (importable from here), repeatable')
  p.set_defaults(func=_summary)

  p = sub.add_parser('train', help='train and evaluate an experiment config',
                     epilog='Any config key can be overridden: --config.train.batch_size=64')
  p.add_argument('--config', required=True, help='an experiment file defining get_config()')
  p.add_argument('--workdir', required=True, help='run directory (resumed if it has checkpoints)')
  p.add_argument('--coordinator', help='multi-process: host:port of process 0 (jax.distributed)')
  p.add_argument('--num-processes', type=int, help='multi-process: number of processes')
  p.add_argument('--process-id', type=int, help='multi-process: this process\'s index')
  p.set_defaults(func=_train)

  p = sub.add_parser('sweep', help='run every point of a config\'s get_sweep() under one root',
                     epilog='--config.KEY=VALUE overrides apply to every point. Finished runs are '
                     'skipped, interrupted ones resumed, failed ones recorded (exit 1 at the end).')
  p.add_argument('--config', required=True, help='an experiment file defining get_config() and get_sweep()')
  p.add_argument('--root', required=True, help='directory holding one run directory per point')
  p.add_argument('--workers', type=int, default=1,
                 help='runs at once, each pinned to its share of the cores (default 1)')
  p.add_argument('--dry-run', action='store_true', help='print the points and their directories')
  p.add_argument('--index', help='run only these points: 3, 0,5,7 or 2-4 (SLURM array tasks)')
  p.add_argument('--count', action='store_true', help='print the number of points and exit')
  p.set_defaults(func=_sweep)

  p = sub.add_parser('report', help='a sweep root: results.csv, report.md and plots; one run '
                     'directory: its curves, confusion matrix and report.md')
  p.add_argument('root', help='the --root of `cnnlab sweep` (or any directory of run '
                 'directories), or one run\'s --workdir')
  p.add_argument('--no-plots', action='store_true', help='only the tables')
  p.set_defaults(func=_report)

  p = sub.add_parser('runs', help='the runs under a directory: state, step, metric, wall time')
  p.add_argument('root', help='a directory of run directories (searched below), or one run')
  p.add_argument('--state', action='append', choices=STATES,
                 help='only runs in this state (repeatable)')
  p.set_defaults(func=_runs)

  from cnnlab import embed, explain_cli, predict, pretrained_cli  # (no JAX until a command runs)
  predict.add_parser(sub)
  embed.add_parser(sub)
  pretrained_cli.add_parser(sub)
  explain_cli.add_parser(sub)

  p = sub.add_parser('prepare', help='download/generate a dataset into the data directory')
  p.add_argument('name', help='dataset name (see cnnlab.data.list_datasets())')
  p.add_argument('--data-dir', help='default: $CNNLAB_DATA_DIR, $TFDS_DATA_DIR or ~/.cache/cnnlab/datasets')
  p.set_defaults(func=_prepare)

  p = sub.add_parser('models', help='list the registered models')
  p.add_argument('--import', dest='imports', action='append', metavar='MODULE',
                 help='a module registering your own models (importable from here), repeatable')
  p.set_defaults(func=_models)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv, overrides = _split_config_overrides(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  args.overrides = overrides
  if overrides and args.command not in ('train', 'sweep'):
    build_parser().error(f'--config.* overrides apply to train and sweep only, got {overrides}')
  try:
    return args.func(args)
  except ValueError as e:  # bad input: a clear message, no traceback
    print(f'cnnlab {args.command}: error: {e}', file=sys.stderr)  # train: train.ERROR_PREFIX
    return 2


if __name__ == '__main__':
  sys.exit(main())
