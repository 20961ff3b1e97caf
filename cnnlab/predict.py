"""`cnnlab predict`: a trained run's predictions on a dataset split or on your own images, written
as arrays (predictions.npz) and PNG panels a person reads at a glance (input, truth where it is
known, prediction: masks as colour overlays, boxes drawn).

  cnnlab predict --run DIR --dataset shapes --split test --out DIR [--num 16]
  cnnlab predict --run DIR --images FILE.npy|DIR_OF_PNGS|FILE.png ... --out DIR

The task of the run (cnnlab.tasks) decides what is predicted and drawn.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from cnnlab import workdir  # (no JAX: the parsers build without it)

PANEL_SIZE = 8  # examples per panel PNG


def predict_in_batches(run, images: np.ndarray, batch_size: int = 64) -> Any:
  """run.predict over (N, H, W, C) uint8 images, batch by batch, as numpy arrays."""
  import jax
  parts = [jax.tree.map(np.asarray, run.predict(images[i:i + batch_size]))
           for i in range(0, len(images), batch_size)]
  return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def write(run, images: np.ndarray, out: str, truth: dict[str, np.ndarray] | None = None,
          *, title: str = '') -> dict[str, Any]:
  """Writes OUT/predictions.npz (the images, the prediction's arrays, the truth as true_*) and
  OUT/panel_NNN.png (PANEL_SIZE examples each); returns the paths."""
  os.makedirs(out, exist_ok=True)
  prediction = predict_in_batches(run, images)
  arrays = {'image': images}
  arrays.update(prediction if isinstance(prediction, dict) else {'logits': prediction})
  arrays.update({f'true_{k}': v for k, v in (truth or {}).items()})
  npz = os.path.join(out, 'predictions.npz')
  np.savez_compressed(npz, **arrays)
  panels = []
  for start in range(0, len(images), PANEL_SIZE):
    part = slice(start, start + PANEL_SIZE)
    panels.append(run.task.figure(
        images[part], _rows(prediction, part), None if truth is None else _rows(truth, part),
        os.path.join(out, f'panel_{start // PANEL_SIZE:03d}.png'),
        title=f'{title}examples {start}..{min(start + PANEL_SIZE, len(images)) - 1}'))
  return {'npz': npz, 'panels': panels}


def _rows(tree, part: slice):
  if isinstance(tree, dict):
    return {k: v[part] for k, v in tree.items()}
  return tree[part]


def command(args: argparse.Namespace) -> int:
  from cnnlab.data import examples as data_examples
  from cnnlab.inference import load_run
  run = load_run(args.run, args.step)
  if (args.dataset is None) == (args.images is None):
    raise ValueError('give either --dataset NAME (with --split) or --images FILE.npy|DIR')
  if args.dataset is not None:
    examples = data_examples.first(run.config.data, run.image_shape, args.dataset, args.split,
                                   args.num)
    images = examples.pop('image')
    truth, title = run.task.truth(examples), f'{args.dataset}/{args.split}: '
  else:
    images = data_examples.read_images(args.images, run.image_shape)[:args.num]
    truth = None
    names = [os.path.basename(os.path.normpath(path)) for path in args.images]
    title = ', '.join(names[:2]) + (', ...: ' if len(names) > 2 else ': ')
  paths = write(run, images, args.out, truth, title=f'{run.task.name}, {title}')
  print(f'wrote {paths["npz"]} and {len(paths["panels"])} panel(s) '
        f'({len(images)} images, step {run.step})')
  return 0


def add_parser(subparsers) -> None:
  p = subparsers.add_parser('predict', help='a run\'s predictions on a dataset split or your own '
                            'images: predictions.npz and PNG panels')
  workdir.add_run_arguments(p)
  p.add_argument('--dataset', help='a dataset name (the run\'s own settings when it is the '
                 'run\'s dataset)')
  p.add_argument('--split', default='test', help='the split of --dataset (default test)')
  p.add_argument('--images', nargs='+', metavar='PATH',
                 help='PNG/JPEG files, directories of them, or .npy arrays ((N, H, W[, C]) uint8 '
                 'or 0..1 floats), fitted to the run\'s input size and channels')
  p.add_argument('--num', type=int, default=16, help='examples to predict (default 16)')
  p.add_argument('--out', required=True, help='directory for predictions.npz and panel_*.png')
  p.set_defaults(func=command)


__all__ = ['predict_in_batches', 'write', 'add_parser']
