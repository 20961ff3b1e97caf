"""`cnnlab predict`: a trained run's predictions on a dataset split or on your own images, written
as arrays (predictions.npz) and PNG panels a person reads at a glance (input, truth where it is
known, prediction: masks as colour overlays, boxes drawn).

  cnnlab predict --run DIR --dataset shapes --split test --out DIR [--num 16]
  cnnlab predict --run DIR --images FILE.npy | DIR_OF_PNGS --out DIR

The task of the run (cnnlab.tasks) decides what is predicted and drawn.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
PANEL_SIZE = 8  # examples per panel PNG


def read_images(path: str, image_shape) -> np.ndarray:
  """(N, H, W, C) uint8 images from a `.npy` file ((N, H, W, C) or (N, H, W); uint8, or floats in
  0..1) or a directory of PNG/JPEG files (sorted by name), resized (bilinear) and converted
  (grey <-> RGB) to `image_shape` (H, W, C) where they differ."""
  from PIL import Image
  h, w, c = image_shape
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
      raise ValueError(f'--images {path!r}: no {"/".join(IMAGE_SUFFIXES)} files in the directory')
    pictures = [Image.open(os.path.join(path, f)) for f in files]
  elif path.endswith('.npy'):
    try:
      array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f'--images {path!r}: not a readable .npy array ({e})') from None
    if array.ndim == 3:
      array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
      raise ValueError(f'--images {path!r}: an array of shape {array.shape}; expected (N, H, W, C) '
                       'with C = 1 or 3, or (N, H, W)')
    if array.dtype != np.uint8:
      if not np.issubdtype(array.dtype, np.floating) or array.min() < 0 or array.max() > 1:
        raise ValueError(f'--images {path!r}: {array.dtype} values {array.min():.3g}..'
                         f'{array.max():.3g}; expected uint8 (0..255) or floats in 0..1')
      array = np.round(array * 255).astype(np.uint8)
    pictures = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in array]
  else:
    raise ValueError(f'--images {path!r}: expected a .npy file or a directory of '
                     f'{"/".join(IMAGE_SUFFIXES)} files')
  out = []
  for picture in pictures:
    picture = picture.convert('L' if c == 1 else 'RGB')
    if picture.size != (w, h):
      picture = picture.resize((w, h), Image.Resampling.BILINEAR)
    array = np.asarray(picture, np.uint8)
    out.append(array[..., None] if c == 1 else array)
  return np.stack(out)


def dataset_examples(run, name: str, split: str, num: int) -> dict[str, np.ndarray]:
  """The first `num` examples of `name`/`split` as arrays (image and the targets the dataset
  has), read as the run's training read its data (its data directory and builder settings when
  `name` is the run's dataset)."""
  from cnnlab import data
  from cnnlab.data import sources
  config = run.config.data
  kwargs = data.builder_kwargs(config) if name == config.name else {}
  image_size = config.image_size if name == config.name else None
  info = data.info(name, data_dir=config.data_dir, image_size=image_size, **kwargs)
  if tuple(info.image_shape) != tuple(run.image_shape):
    raise ValueError(f'{name} has {info.image_shape} images; the run was trained on '
                     f'{tuple(run.image_shape)}')
  source = data.load(name, split, data_dir=config.data_dir, **kwargs)
  convert = sources.RecordConverter(info, split, image_size)
  indices = range(min(num, len(source)))
  examples = [convert(source[i], i) for i in indices]
  return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


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
  from cnnlab.inference import load_run
  run = load_run(args.run, args.step)
  if (args.dataset is None) == (args.images is None):
    raise ValueError('give either --dataset NAME (with --split) or --images FILE.npy|DIR')
  if args.dataset is not None:
    examples = dataset_examples(run, args.dataset, args.split, args.num)
    images = examples.pop('image')
    truth, title = run.task.truth(examples), f'{args.dataset}/{args.split}: '
  else:
    images, truth = read_images(args.images, run.image_shape)[:args.num], None
    title = f'{os.path.basename(os.path.normpath(args.images))}: '
  paths = write(run, images, args.out, truth, title=f'{run.task.name}, {title}')
  print(f'wrote {paths["npz"]} and {len(paths["panels"])} panel(s) '
        f'({len(images)} images, step {run.step})')
  return 0


def add_parser(subparsers) -> None:
  p = subparsers.add_parser('predict', help='a run\'s predictions on a dataset split or your own '
                            'images: predictions.npz and PNG panels')
  p.add_argument('--run', required=True, help='a run directory (--workdir of cnnlab train)')
  p.add_argument('--step', default=None,
                 help='checkpoint: a step number or "best" (default: the latest)')
  p.add_argument('--dataset', help='a dataset name (the run\'s own settings when it is the '
                 'run\'s dataset)')
  p.add_argument('--split', default='test', help='the split of --dataset (default test)')
  p.add_argument('--images', help='a .npy array (N, H, W, C) or a directory of PNG/JPEG files, '
                 'resized to the run\'s input size')
  p.add_argument('--num', type=int, default=16, help='examples to predict (default 16)')
  p.add_argument('--out', required=True, help='directory for predictions.npz and panel_*.png')
  p.set_defaults(func=command)


__all__ = ['read_images', 'dataset_examples', 'predict_in_batches', 'write', 'add_parser']
