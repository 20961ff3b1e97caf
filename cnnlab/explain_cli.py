"""`cnnlab explain`: what a trained run looks at, as PNG grids and .npz arrays.

    cnnlab explain --run runs/quickstart --method grad_cam --method saliency --num 16
    cnnlab explain --run runs/quickstart --filters stage1_conv1 --feature-maps stage2
    cnnlab explain --run runs/quickstart --top-activations stage3_conv1 --channel 5 --limit 1000
    cnnlab explain --run runs/quickstart --method occlusion --window 6 --stride 3 --images my.png

The images are the first --num examples of --split of --dataset (default: the run's), or
--images (PNG/JPEG files, directories of them, or .npy arrays, fitted to the run's input). Each
method writes OUT/METHOD.png (per image: the picture captioned with the true class, the predicted
class and its probability, beside the heat map over it) and OUT/METHOD.npz (images, labels,
predicted, probabilities, target, attributions). OUT defaults to RUN/explain.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import numpy as np

from cnnlab import workdir  # (no JAX: the parsers build without it)


def _ints(text: str) -> int | tuple[int, ...]:
  try:
    values = tuple(int(v) for v in text.replace('x', ',').split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected N or H,W, got {text!r}') from None
  return values[0] if len(values) == 1 else values


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Registers `explain` on a `cnnlab` subparsers object; the handler is `args.func(args)`, which
  raises ValueError for bad input. Builds the parser without importing JAX."""
  from cnnlab.explain import METHOD_NAMES
  p = subparsers.add_parser(
      'explain', help='what a trained run looks at: attributions, filters, feature maps, top '
      'activations (PNG grids and .npz)', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  workdir.add_run_arguments(p)
  p.add_argument('--method', action='append', choices=METHOD_NAMES, default=[],
                 help='an attribution method (repeatable)')
  p.add_argument('--layer', metavar='NAME',
                 help='grad_cam: the layer (default: the last spatial layer of the model)')
  p.add_argument('--target', choices=('predicted', 'true'), default='predicted',
                 help='the class explained for each image (default: the predicted one)')
  p.add_argument('--steps', type=int, default=50, help='integrated_gradients: integration points')
  p.add_argument('--baseline', type=float, default=0.0,
                 help='integrated_gradients, occlusion: the baseline value, in normalised units '
                 '(0: the training mean)')
  p.add_argument('--window', type=_ints, default=None, metavar='N|H,W',
                 help='occlusion: the window (default: a seventh of the image side)')
  p.add_argument('--stride', type=_ints, default=None, metavar='N|H,W',
                 help='occlusion: the stride (default: half the window)')
  p.add_argument('--dataset', default=None, metavar='NAME', help="default: the run's dataset")
  p.add_argument('--split', default='test')
  p.add_argument('--num', type=int, default=16, help='examples explained (the first of the split)')
  p.add_argument('--indices', type=int, nargs='+', metavar='I',
                 help='explain these examples of the split instead of the first --num')
  p.add_argument('--images', nargs='+', metavar='PATH',
                 help='PNG/JPEG files, directories of them or .npy arrays instead of the dataset')
  p.add_argument('--filters', action='append', default=[], metavar='LAYER',
                 help="a convolution's filters (repeatable)")
  p.add_argument('--feature-maps', action='append', default=[], metavar='LAYER',
                 help='a layer\'s feature maps of the first image (all images in the .npz)')
  p.add_argument('--top-activations', action='append', default=[], metavar='LAYER',
                 help='the dataset patches that excite --channel of LAYER most, with their '
                 'deconvnet projections')
  p.add_argument('--channel', type=int, action='append', default=None,
                 help='top activations: the channel (repeatable; default 0)')
  p.add_argument('--k', type=int, default=9, help='top activations: how many patches')
  p.add_argument('--limit', type=int, default=None,
                 help='top activations: rank the first LIMIT examples of the split (default all)')
  p.add_argument('--out', default=None, metavar='DIR', help='default: RUN/explain')
  p.set_defaults(func=main)
  return p


def _file_name(layer: str) -> str:
  return layer.replace('/', '.')


def _options(method: str, args, layer: str | None) -> dict:
  if method == 'integrated_gradients':
    return {'steps': args.steps, 'baseline': args.baseline}
  if method == 'occlusion':
    return {'window': args.window, 'stride': args.stride, 'baseline': args.baseline}
  if method == 'grad_cam':
    return {'layer': layer}
  return {}


def explain_images(run, method: str, images, target, **options):
  """`method` on the run's model, jitted: (B, H, W, C) normalised images -> its result."""
  import jax
  from cnnlab.explain import METHODS
  fn = jax.jit(functools.partial(METHODS[method], run.model, **options))
  return jax.block_until_ready(fn(run.variables, images, target))


def _check_request(args, run, info) -> None:
  """Every layer, window and option the command was given, checked before anything is computed."""
  from cnnlab.explain import features, perturbation
  if args.target == 'true' and args.images:
    raise ValueError('--target true needs labelled images: --dataset, not --images')
  if 'grad_cam' in args.method and args.layer:
    info.layer(args.layer, spatial=True, tap=True)
  if 'occlusion' in args.method:
    perturbation.windows(run.image_shape, args.window, args.stride)
  for layer in args.filters:
    features.filters(run.variables, layer)
  for layer in args.feature_maps:
    info.layer(layer, spatial=True)
  for layer in args.top_activations:
    channels = info.layer(layer, spatial=True, tap=True).shape[-1]
    for channel in args.channel or [0]:
      if not 0 <= channel < channels:
        raise ValueError(f'--channel {channel} is outside layer {layer!r}, which has {channels} '
                         'channels')


def main(args: argparse.Namespace) -> int:
  import jax
  from cnnlab import inference
  from cnnlab.data import examples
  from cnnlab.explain import features, figures, probe
  from cnnlab.explain.cam import default_layer
  if not (args.method or args.filters or args.feature_maps or args.top_activations):
    raise ValueError('nothing to explain: give --method, --filters, --feature-maps or '
                     '--top-activations')
  if args.num < 1 or args.k < 1 or args.steps < 2:
    raise ValueError(f'--num and --k must be >= 1 and --steps >= 2, got {args.num}, {args.k}, '
                     f'{args.steps}')
  run = inference.load_run(args.run, args.step)
  dataset = args.dataset or run.config.data.name
  if args.images and args.indices:
    raise ValueError('--indices picks examples of the dataset; it does not go with --images')
  if args.images:
    images, labels = examples.read_images(args.images, run.image_shape), None
  else:
    chosen = (examples.at(run.config.data, run.image_shape, dataset, args.split, args.indices)
              if args.indices else
              examples.first(run.config.data, run.image_shape, dataset, args.split, args.num))
    images, labels = chosen['image'], chosen['label']
  x = run.preprocess(images)
  _, _, info = probe.check(run.model, run.variables, x)
  _check_request(args, run, info)
  out = args.out or os.path.join(args.run, 'explain')
  os.makedirs(out, exist_ok=True)

  logits = jax.jit(lambda v, x: probe.logits(run.model, v, x))(run.variables, x)
  probabilities = np.asarray(jax.nn.softmax(logits.astype(np.float32), axis=-1))
  predicted = probabilities.argmax(-1)
  target = predicted if args.target == 'predicted' else labels
  probability = probabilities[np.arange(len(predicted)), predicted]
  base = {'images': images, 'predicted': predicted, 'target': target, 'probabilities': probability,
          'labels': np.full(len(images), -1) if labels is None else labels}
  run_name = f'{os.path.basename(os.path.abspath(args.run))} step {run.step}'
  for method in dict.fromkeys(args.method):  # each once, in the order given
    layer = (args.layer or default_layer(info)) if method == 'grad_cam' else None
    start = time.perf_counter()
    result = explain_images(run, method, x, np.asarray(target, np.int32),
                            **_options(method, args, layer))
    seconds = time.perf_counter() - start
    if method == 'grad_cam':
      arrays = {'cam': np.asarray(result.cam), 'attributions': np.asarray(result.upsampled)}
      maps, signed, what = arrays['attributions'], False, f'grad_cam at {layer}'
    else:
      arrays = {'attributions': np.asarray(result)}
      signed = method != 'saliency'  # the others have a sign: for the class, or against it
      maps, what = figures.heatmap(arrays['attributions'], signed), method
    np.savez_compressed(os.path.join(out, f'{method}.npz'), **base, **arrays)
    png = figures.attribution_grid(
        images, maps, os.path.join(out, f'{method}.png'), signed=signed, labels=labels,
        predicted=predicted, probability=probability,
        title=f'{what} of the {args.target} class - {run_name}')
    print(f'{method}: {png} ({seconds:.2f} s, {len(images)} images)')

  for layer in args.filters:
    kernel = np.asarray(features.filters(run.variables, layer))
    path = os.path.join(out, f'filters_{_file_name(layer)}')
    np.savez_compressed(path + '.npz', kernel=kernel)
    png = figures.filters_grid(kernel, path + '.png', title=f'{layer} filters {kernel.shape}')
    print(f'filters {layer}: {png}')

  for layer in args.feature_maps:
    maps = np.asarray(jax.jit(lambda v, x: features.feature_maps(run.model, v, x, layer)[layer])(
        run.variables, x))
    path = os.path.join(out, f'feature_maps_{_file_name(layer)}')
    np.savez_compressed(path + '.npz', images=images, maps=maps)
    png = figures.feature_maps_grid(images[0], maps[0], path + '.png',
                                    title=f'{layer} on image 0 {maps.shape[1:]}')
    print(f'feature maps {layer}: {png}')

  for layer in args.top_activations:
    for channel in args.channel or [0]:
      source = images if args.images else dataset
      top = features.top_activations(run, layer, channel, source, args.k, split=args.split,
                                     limit=args.limit)
      path = os.path.join(out, f'top_activations_{_file_name(layer)}_c{channel}')
      np.savez_compressed(path + '.npz', index=top.index, value=top.value,
                          position=top.position, boxes=np.asarray(top.boxes), images=top.images,
                          patches=top.patches, projections=top.projections,
                          projection_patches=top.projection_patches)
      png = figures.top_activations_figure(top, path + '.png')
      print(f'top activations {layer} channel {channel}: {png}')
  return 0

__all__ = ['add_parser', 'main', 'explain_images']
