"""Convolutions of maps smaller than their kernel on CPU: XLA's convolution against cnnlab's
patches product (`cnnlab.layers.conv.conv_general_dilated`, what ConvBlock runs on CPU where XLA
would swap the convolution's operands, or its gradient's, and run it as a naive loop).

  python bench/bench_small_conv.py                       # XLA's default optimisation
  python bench/bench_small_conv.py --test-flags          # the test suite's (tests/conftest.py)
  python bench/bench_small_conv.py --shapes 8x2x2x512:3x512,8x4x4x256:3x512/2 --dtype bfloat16

A shape is BxHxWxC:KxO[/S]: a BxHxWxC NHWC input, a KxK 'SAME' convolution to O channels, stride
S (default 1). The defaults are ResNet-18's last stage at a 16x16 input (batch 8, and 2: batch 8
on 4 devices), GoogLeNet's 2x2 and 1x1 inception branches at a 32x32 input (batch 32), and
convolutions XLA does not swap. Columns, in ms under `jax.jit` (median of --repeats calls after
one warm-up), with XLA_FLAGS' convolution library set as cnnlab sets it (parallel.fast_cpu_flags):

  swapped     which of the forward, input-gradient and kernel-gradient convolutions XLA swaps
              (cnnlab.layers.conv.xla_swaps_operands; '-': none, and ConvBlock keeps the conv)
  conv        lax.conv_general_dilated: forward, and forward plus both gradients (value_and_grad)
  patches     the patches product (`_patches_conv`), timed for every shape, swapped or not
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

DEFAULT_SHAPES = ','.join((
    '8x2x2x512:3x512', '2x2x2x512:3x512', '8x4x4x256:3x512/2', '8x1x1x512:3x512',
    '8x2x2x256:3x256', '32x2x2x96:3x208', '32x2x2x160:3x320', '32x1x1x160:3x320',
    '32x1x1x192:3x384', '32x1x1x48:3x128', '8x3x3x512:3x512', '8x4x4x512:3x512',
    '8x8x8x256:3x512/2'))

TEST_FLAGS = ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true',
              '--xla_cpu_use_fusion_emitters=false')


def parse_shape(text: str):
  """'BxHxWxC:KxO[/S]' -> ((B, H, W, C), K, O, S)."""
  try:
    lhs, rhs = text.split(':')
    rhs, _, stride = rhs.partition('/')
    shape = tuple(int(v) for v in lhs.split('x'))
    kernel, features = (int(v) for v in rhs.split('x'))
    if len(shape) != 4:
      raise ValueError
    return shape, kernel, features, int(stride or 1)
  except ValueError:
    raise SystemExit(f'--shapes: {text!r} is not BxHxWxC:KxO[/S]') from None


def median_ms(fn, *args, repeats: int) -> float:
  import jax
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - started)
  return statistics.median(times) * 1e3


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shapes', default=DEFAULT_SHAPES, help='comma list of BxHxWxC:KxO[/S]')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--test-flags', action='store_true',
                      help="add the test suite's XLA flags (lowest optimisation level)")
  args = parser.parse_args(argv)
  shapes = [parse_shape(text) for text in args.shapes.split(',')]
  if args.test_flags:
    os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), *TEST_FLAGS]).strip()
  from cnnlab import parallel
  parallel.fast_cpu_flags()
  import jax
  import jax.numpy as jnp
  from jax import lax
  from cnnlab.layers import conv as conv_module
  dims = ('NHWC', 'HWIO', 'NHWC')
  print(f"backend {jax.default_backend()}, {args.dtype}, XLA_FLAGS={os.environ['XLA_FLAGS']!r}; "
        f'ms, median of {args.repeats}')
  print()
  print('| input | kernel | swapped | conv fwd | patches fwd | conv fwd+bwd | patches fwd+bwd |')
  print('|---|---|---|---|---|---|---|')
  for shape, kernel, features, stride in shapes:
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], shape).astype(args.dtype)
    w = (jax.random.normal(keys[1], (kernel, kernel, shape[3], features)) /
         (kernel * shape[3] ** 0.5)).astype(args.dtype)
    strides = (stride, stride)
    taps = conv_module._swapped_conv_taps(x, w, strides, 'SAME', None, None, dims, 1, 1,
                                          swapped_only=False)
    convs = conv_module.gradient_convolutions(shape[1:3], (kernel, kernel), strides, taps['pads'],
                                              (1, 1), taps['out'])
    swapped = ', '.join(name for name, conv in convs.items()
                        if conv_module.xla_swaps_operands(*conv)) or '-'
    forms = {
        'conv': lambda x, w: lax.conv_general_dilated(x, w, strides, 'SAME',
                                                      dimension_numbers=dims),
        'patches': lambda x, w: conv_module._patches_conv(x, w, **taps, precision=None,
                                                          preferred_element_type=None),
    }
    cotangent = jax.random.normal(keys[2], jax.eval_shape(forms['conv'], x, w).shape)
    times = {}
    for name, form in forms.items():
      loss = lambda x, w, form=form: jnp.sum(form(x, w).astype(jnp.float32) * cotangent)
      times[name] = (median_ms(jax.jit(form), x, w, repeats=args.repeats),
                     median_ms(jax.jit(jax.value_and_grad(loss, (0, 1))), x, w,
                               repeats=args.repeats))
    cells = [f"{times['conv'][0]:.2f}", f"{times['patches'][0]:.2f}",
             f"{times['conv'][1]:.2f}", f"{times['patches'][1]:.2f}"]
    print(f"| {'x'.join(map(str, shape))} | {kernel}x{kernel}/{stride} -> {features} | "
          f"{swapped} | " + ' | '.join(cells) + ' |', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
