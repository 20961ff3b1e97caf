"""`cnnlab embed`: what a trained run's features make of a dataset split, as arrays and a 2-D map.

  cnnlab embed --run DIR --dataset mnist5k --split test --out embed/test.npz
  cnnlab embed --run DIR --layer stage2 --map tsne --limit 500 --out embed/stage2.npz
  cnnlab embed --run DIR --images my_digits/ --out embed/mine.npz

The features are the penultimate ones (the input of the model's last dense layer: the pooled
pre-logits of a ResNet, VGG's second 4096-wide layer) or, with --layer, a named layer's output,
averaged over space when it is a (B, h, w, C) feature map. FILE.npz holds features (N, D)
float32, labels (N,) (-1 for --images), map (N, 2) float32, layer and method; FILE.png beside it
draws the map coloured by class. The map is PCA by default, which is linear, so distances in it
mean something; t-SNE (--map tsne, seed 0) separates clusters better and takes longer.

The same steps from Python: `penultimate(model, variables, images)`, `features(run, images)`,
`project(features, 'pca')`, `scatter(points, labels, path)`.
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

import numpy as np

from cnnlab import workdir  # (no JAX: the parsers build without it)

METHODS = ('pca', 'tsne')
PENULTIMATE = 'penultimate'  # the layer name stored when --layer is not given
LEGEND_MAX = 20  # classes named in the figure's legend; more are coloured without one


def _vectors(x):
  """(B, h, w, C) -> (B, C) averaged over space (the global average pool every model here ends
  with, so a stage's vector is comparable to the pre-logits); (B, ...) -> (B, D) flattened.
  float32 whatever the compute dtype: a bfloat16 mean over a 56x56 map loses digits."""
  import jax.numpy as jnp
  x = x.astype(jnp.float32)
  return jnp.mean(x, axis=(1, 2)) if x.ndim == 4 else x.reshape((x.shape[0], -1))


def penultimate(model, variables, images):
  """(B, D) float32 penultimate features of (B, H, W, C) normalised images: the input of the
  model's last nn.Dense call in inference mode (conv_stack's and the ResNets' pooled pre-logits,
  AlexNet's and VGG's last hidden layer), averaged over space if that input is a feature map.
  ValueError when the model calls no dense layer. Jittable.

  The last dense call, not a sown 'pre_logits', because every classifier has one and not every
  model sows. A model with several heads (the localizer's box head comes after its class head)
  gives the input of whichever dense layer it calls last."""
  import flax.linen as nn
  from cnnlab.explain import probe
  inputs = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == '__call__':
      inputs.append(args[0] if args else kwargs['inputs'])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    probe.apply(model, variables, images)
  if not inputs:
    raise ValueError(f'{type(model).__name__} calls no dense layer, so it has no penultimate '
                     'features (the input of its last nn.Dense); name a layer instead (--layer '
                     'NAME, or layer= in Python)')
  return _vectors(inputs[-1])


def _embedder(run, layer: str | None):
  """f(variables, x) -> (B, D) float32 features of normalised images x, for `layer` (None: the
  penultimate ones). A named layer is checked here, by an abstract trace, so an unknown name
  lists the layers (and their shapes) before any example is read."""
  import jax.numpy as jnp
  from cnnlab.explain import probe
  if layer is None:
    return lambda variables, x: penultimate(run.model, variables, x)
  _, _, info = probe.check(run.model, run.variables, jnp.zeros((1, *run.image_shape), jnp.float32))
  info.layer(layer)
  return lambda variables, x: _vectors(probe.capture(run.model, variables, x, info, [layer])[layer])


def width(run, layer: str | None = None) -> int:
  """D, the number of features `features(run, ..., layer)` gives per image, from an abstract
  evaluation (no FLOPs); raises the errors `features` would (unknown layer, no dense layer)."""
  import jax
  x = jax.ShapeDtypeStruct((1, *run.image_shape), np.float32)
  return int(jax.eval_shape(_embedder(run, layer), run.variables, x).shape[-1])


def features(run, images: np.ndarray, layer: str | None = None,
             batch_size: int = 256) -> np.ndarray:
  """(N, D) float32 features of uint8 (N, H, W, C) images at `run.image_shape` (as
  cnnlab.data.examples reads them) for `layer` (None: `penultimate`), batch by batch.

  run: a cnnlab.inference.LoadedRun. The function is jitted once: the last batch is padded to
  the batch size (min(batch_size, N)) so only one shape compiles, and the padding dropped."""
  import jax
  images = np.asarray(images)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')
  if images.ndim != 4 or not len(images):
    raise ValueError(f'images must be (N, H, W, C) with N >= 1, got shape {images.shape}')
  fn = jax.jit(_embedder(run, layer))
  size = min(batch_size, len(images))
  parts = []
  for start in range(0, len(images), size):
    batch = images[start:start + size]
    count = len(batch)
    if count < size:
      batch = np.concatenate([batch, np.zeros((size - count, *batch.shape[1:]), batch.dtype)])
    parts.append(np.asarray(fn(run.variables, run.preprocess(batch)))[:count])
  return np.concatenate(parts)


def project(features: np.ndarray, method: str = 'pca', seed: int = 0) -> np.ndarray:
  """(N, D) features -> (N, 2) float32 map: PCA's first two components (scikit-learn), or t-SNE
  (scikit-learn, PCA initialisation, perplexity min(30, (N - 1) / 3) as it must stay below N).
  With a single feature (D = 1) PCA's map has a zero second column."""
  if method not in METHODS:
    raise ValueError(f'map method must be one of {METHODS}, got {method!r}')
  x = np.asarray(features)
  if x.ndim != 2 or len(x) < 2 or x.shape[1] < 1:
    raise ValueError(f'a map needs (N, D) features with N >= 2 examples, got shape {x.shape}')
  if not np.isfinite(x).all():
    raise ValueError(f'the features hold {int((~np.isfinite(x)).sum())} non-finite values '
                     '(a diverged run?); no map can be drawn')
  if method == 'pca':
    from sklearn.decomposition import PCA
    points = PCA(n_components=min(2, *x.shape), random_state=seed).fit_transform(x)
    points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
  else:
    from sklearn.manifold import TSNE
    points = TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), init='pca',
                  random_state=seed).fit_transform(x)
  return points.astype(np.float32)


def scatter(points: np.ndarray, labels: np.ndarray, path: str,
            class_names: Sequence[str] | None = None, *, title: str = '') -> str:
  """PATH: a PNG scatter of (N, 2) points coloured by label, with a legend of class names (up to
  LEGEND_MAX classes; label -1, an unlabelled image, is grey)."""
  import matplotlib
  from cnnlab.runs import figure
  from cnnlab.tasks.figures import class_name
  points, labels = np.asarray(points), np.asarray(labels)
  if points.ndim != 2 or points.shape[1] != 2 or labels.shape != (len(points),):
    raise ValueError(f'scatter takes (N, 2) points and (N,) labels, got {points.shape} and '
                     f'{labels.shape}')
  classes = sorted(int(k) for k in np.unique(labels) if k >= 0)
  fig = figure(8.5, 6.5)
  ax = fig.add_subplot(1, 1, 1)
  # Qualitative colours while they last; past 20 classes a continuous map (classes are not
  # ordered, but neighbours in it still differ).
  colours = matplotlib.colormaps['tab10' if len(classes) <= 10 else 'tab20' if len(classes) <= 20
                                 else 'turbo']
  size = float(np.clip(3000 / len(points), 3, 30))  # points^2: small dots for big splits
  if (labels < 0).any():
    ax.scatter(*points[labels < 0].T, s=size, c='0.5', label='unlabelled', linewidths=0)
  for i, k in enumerate(classes):
    colour = colours(i if len(classes) <= 20 else i / max(len(classes) - 1, 1))
    ax.scatter(*points[labels == k].T, s=size, color=colour, label=class_name(k, class_names),
               linewidths=0, alpha=0.8)
  ax.set_xlabel('map axis 1')
  ax.set_ylabel('map axis 2')
  if len(classes) <= LEGEND_MAX:
    ax.legend(loc='center left', bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=max(
        1.0, 20 / size) ** 0.5, frameon=False)
  else:
    ax.text(1.02, 0.5, f'{len(classes)} classes,\ntoo many to name', transform=ax.transAxes,
            fontsize=8, va='center')
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout(rect=(0, 0, 0.8, 1))  # one axes: cheap to measure; the legend on the right
  fig.savefig(path)
  return path


def write(out: str, feats: np.ndarray, labels: np.ndarray, points: np.ndarray, *, layer: str,
          method: str, class_names: Sequence[str] | None = None, title: str = '') -> dict:
  """OUT (.npz: features, labels, map, layer, method) and the scatter beside it (same stem,
  .png); returns {'npz': path, 'png': path}."""
  npz = out if out.endswith('.npz') else out + '.npz'  # what np.savez itself would write
  os.makedirs(os.path.dirname(os.path.abspath(npz)), exist_ok=True)
  np.savez_compressed(npz, features=np.asarray(feats, np.float32),
                      labels=np.asarray(labels, np.int64), map=np.asarray(points, np.float32),
                      layer=np.array(layer), method=np.array(method))
  png = scatter(points, labels, npz[:-len('.npz')] + '.png', class_names, title=title)
  return {'npz': npz, 'png': png}


def _class_names(run, dataset: str) -> Sequence[str] | None:
  """The dataset's class names: the run's own (model.json) for its dataset, else the dataset's."""
  if dataset == run.config.data.name:
    return run.task.class_names
  from cnnlab import data
  return data.info(dataset, data_dir=run.config.data.data_dir).class_names


def command(args: argparse.Namespace) -> int:
  from cnnlab import inference
  from cnnlab.data import examples
  if args.limit is not None and args.limit < 1:
    raise ValueError(f'--limit must be >= 1, got {args.limit}')
  if args.images and args.dataset:
    raise ValueError('give --dataset NAME (with --split) or --images PATH ..., not both')
  run = inference.load_run(args.run, args.step)
  dim = width(run, args.layer)  # a bad layer fails before the split is read
  if args.images:
    images = examples.read_images(args.images, run.image_shape)[:args.limit]
    labels, names = np.full(len(images), -1, np.int64), None
    names_given = [os.path.basename(os.path.normpath(p)) for p in args.images]
    source = ', '.join(names_given[:2]) + (', ...' if len(names_given) > 2 else '')
  else:
    dataset = args.dataset or run.config.data.name
    chosen = examples.first(run.config.data, run.image_shape, dataset, args.split, args.limit)
    images = chosen['image']
    labels = chosen.get('label', np.full(len(images), -1, np.int64))
    names, source = _class_names(run, dataset), f'{dataset}/{args.split}'
  layer = args.layer or PENULTIMATE
  feats = features(run, images, args.layer)
  points = project(feats, args.map)
  run_name = os.path.basename(os.path.abspath(args.run))
  paths = write(args.out, feats, labels, points, layer=layer, method=args.map, class_names=names,
                title=f'{run_name} step {run.step}: {layer} ({dim} features), {args.map} of '
                f'{len(images)} {source} examples')
  print(f'wrote {paths["npz"]} and {paths["png"]} ({len(images)} examples, {dim} features of '
        f'{layer}, {args.map} map, step {run.step})')
  return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Registers `embed` on a `cnnlab` subparsers object; the handler is `args.func(args)`, which
  raises ValueError for bad input. Builds the parser without importing JAX."""
  p = subparsers.add_parser(
      'embed', help="a run's penultimate (or a layer's) features of a split, with a 2-D PCA or "
      't-SNE map coloured by class (.npz and .png)', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  workdir.add_run_arguments(p)
  p.add_argument('--dataset', default=None, metavar='NAME', help="default: the run's dataset")
  p.add_argument('--split', default='test', help='the split of --dataset (default test)')
  p.add_argument('--images', nargs='+', metavar='PATH',
                 help='PNG/JPEG files, directories of them or .npy arrays instead of the dataset '
                 '(labels -1)')
  p.add_argument('--layer', default=None, metavar='NAME',
                 help='a module path or sown name (default: the penultimate features, the input '
                 'of the last dense layer); feature maps are averaged over space')
  p.add_argument('--map', choices=METHODS, default='pca',
                 help='the 2-D map: pca (default) or tsne (seed 0)')
  p.add_argument('--limit', type=int, default=None,
                 help='embed only the first LIMIT examples (default: all)')
  p.add_argument('--out', required=True, metavar='FILE.npz',
                 help='the arrays; the map is drawn beside it as FILE.png')
  p.set_defaults(func=command)
  return p


__all__ = ['METHODS', 'PENULTIMATE', 'penultimate', 'width', 'features', 'project', 'scatter',
           'write', 'add_parser']
