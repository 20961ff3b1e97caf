"""`cnnlab convert`: torchvision weights (.safetensors, .pth, .pt) -> a cnnlab run directory.

    cnnlab convert --arch resnet50 --weights resnet50-11ad3fa6.pth --out runs/resnet50_imagenet
    # then, in Python: load_run('runs/resnet50_imagenet').predict(uint8_images)  # (B, 1000)

The run directory loads with `cnnlab.inference.load_run` like a trained run (config.json,
model.json, a checkpoint at step 0), taking (B, 224, 224, 3) uint8 images normalised as
torchvision's ImageNet models expect. No JAX is imported until the command runs.
"""

from __future__ import annotations

import argparse

ARCH_HELP = ('a torchvision architecture cnnlab has: alexnet, vgg11, vgg13, vgg16, vgg19 (and '
             '_bn), resnet18, resnet34, resnet50, resnet101, resnet152, googlenet')


def _positive(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f'expected a positive number of pixels, got {text!r}')
  return value


def _convert(args: argparse.Namespace) -> int:
  import jax
  from cnnlab import pretrained
  model_args = {'transform_input': True} if args.transform_input else {}
  if args.transform_input and args.arch != 'googlenet':
    raise ValueError(f'--transform-input is a googlenet option; --arch is {args.arch!r}')
  try:
    model, variables = pretrained.load_weights(args.weights, args.arch, **model_args)
  except FileNotFoundError as e:  # `cnnlab` prints a ValueError as one line, without a traceback
    raise ValueError(str(e)) from None
  pretrained.save_converted(args.arch, variables, args.out, model_args=model_args,
                            image_size=args.image_size)
  count = sum(int(v.size) for v in jax.tree.leaves(variables['params']))
  print(f'{args.weights} -> {args.out}: {args.arch}, {model.num_classes} classes, '
        f'{count:,} parameters, input {args.image_size}x{args.image_size}x3 normalised with '
        f'ImageNet mean/std; load it with cnnlab.inference.load_run({args.out!r})')
  if args.arch == 'googlenet' and not args.transform_input:
    print('note: torchvision\'s ImageNet GoogLeNet weights expect --transform-input (torchvision '
          'sets transform_input=True when it loads them)')
  return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Registers `convert` on the `add_subparsers()` object of `cnnlab`'s parser; returns its parser.
  Its handler is `args.func(args) -> exit code`, raising ValueError for bad input."""
  p = subparsers.add_parser(
      'convert', help='torchvision weights (.safetensors, .pth, .pt) -> a run directory that '
      'load_run reads', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--arch', required=True, help=ARCH_HELP)
  p.add_argument('--weights', required=True,
                 help='a state dict: .safetensors (read without torch) or .pth/.pt (needs torch; '
                 'read with weights_only=True, never unpickling code)')
  p.add_argument('--out', required=True, help='the run directory to write (new or empty)')
  p.add_argument('--image-size', type=_positive, default=224,
                 help='side of the square RGB images the run declares (default 224)')
  p.add_argument('--transform-input', action='store_true',
                 help='googlenet: re-normalise the input as torchvision\'s transform_input (what '
                 'its ImageNet weights expect)')
  p.set_defaults(func=_convert)
  return p
