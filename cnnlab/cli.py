"""The `cnnlab` console script: `cnnlab <command> ...` (see `cnnlab --help`)."""

from __future__ import annotations

import argparse
import json
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


def _summary(args: argparse.Namespace) -> int:
  from cnnlab import analysis, models
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
  for name in models.list_models():
    spec = models.get_spec(name)
    print(f'{name:14s} input {"x".join(map(str, spec.input_shape)):10s} classes {spec.num_classes}')
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='cnnlab', description=__doc__)
  sub = parser.add_subparsers(dest='command', required=True)

  p = sub.add_parser('summary', help='per-layer table: shapes, parameters, MACs, receptive field')
  p.add_argument('--model', required=True, help='a registered model name (see `cnnlab models`)')
  p.add_argument('--input-shape', type=_shape, help='H,W,C (default: the model\'s natural size)')
  p.add_argument('--num-classes', type=int)
  p.add_argument('--set', action='append', metavar='KEY=VALUE',
                 help='model argument override, value parsed as JSON when it can be')
  p.add_argument('--json', action='store_true', help='print the table as JSON')
  p.set_defaults(func=_summary)

  p = sub.add_parser('models', help='list the registered models')
  p.set_defaults(func=_models)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except ValueError as e:  # bad input: a clear message, no traceback
    print(f'cnnlab {args.command}: error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
