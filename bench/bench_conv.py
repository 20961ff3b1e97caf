"""Where a CPU train step's time goes: one convolution's forward, input gradient and kernel
gradient, timed separately, next to a square matmul (the machine's GEMM rate) — a benchmark.

  python bench/bench_conv.py                       # fp32 and bf16, quickstart and ResNet-18 layers
  python bench/bench_conv.py --dtypes fp32 --xla-flags=--xla_cpu_experimental_xnn_fusion_type=dot
  python bench/bench_conv.py --torch               # the same layers in PyTorch channels-last
  python bench/bench_conv.py --xla-flags=--xla_cpu_experimental_ynn_fusion_type=individual_convolution
                                                   # YNNPACK's convolutions (cnnlab turns them off)

GFLOP/s counts 2 * MACs of the convolution for each of the three parts (they cost the same
arithmetic), so a slow part stands out directly. Median of --reps runs after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# (name, H=W, C_in, C_out, stride): the quickstart's two costly layers and ResNet-18-CIFAR's stages.
LAYERS = (('quickstart conv2', 14, 32, 64, 1), ('quickstart conv3', 7, 64, 128, 1),
          ('resnet18 stage1', 32, 64, 64, 1), ('resnet18 stage2', 16, 128, 128, 1),
          ('resnet18 stage3', 8, 256, 256, 1), ('resnet18 stage4', 4, 512, 512, 1))


def median_ms(fn, reps):
  fn()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def jax_rows(dtypes, batch, reps):
  import jax
  import jax.numpy as jnp
  from jax import lax
  for dtype in dtypes:
    dt = jnp.dtype(dtype)
    a = jnp.ones((2048, 2048), dt)
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    ms = median_ms(lambda: matmul(a, a).block_until_ready(), reps)
    print(f'{dtype:8s} matmul 2048^3{"":26s} {2 * 2048 ** 3 / ms / 1e6:6.0f} GFLOP/s')
    for name, size, cin, cout, stride in LAYERS:
      def conv(x, k, stride=stride):
        return lax.conv_general_dilated(x, k, (stride, stride), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      x = jax.random.normal(jax.random.key(0), (batch, size, size, cin)).astype(dt)
      k = (0.1 * jax.random.normal(jax.random.key(1), (3, 3, cin, cout))).astype(dt)
      y, vjp = jax.vjp(conv, x, k)
      dy = jnp.ones_like(y)
      fwd, dx, dk = jax.jit(conv), jax.jit(lambda g: vjp(g)[0]), jax.jit(lambda g: vjp(g)[1])
      gflop = 2 * batch * y.shape[1] * y.shape[2] * cin * cout * 9 / 1e9
      parts = [median_ms(lambda: fwd(x, k).block_until_ready(), reps),
               median_ms(lambda: dx(dy).block_until_ready(), reps),
               median_ms(lambda: dk(dy).block_until_ready(), reps)]
      print(f'{dtype:8s} {name:17s} {size:2d}x{size:<2d} {cin:3d}->{cout:3d}  '
            + '  '.join(f'{p} {gflop / t * 1e3:4.0f}' for p, t in zip(('fwd', 'dx', 'dw'), parts))
            + ' GFLOP/s', flush=True)


def torch_rows(dtypes, batch, reps):
  import torch
  for dtype in dtypes:
    dt = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
    for name, size, cin, cout, stride in LAYERS:
      x = torch.randn(batch, cin, size, size).to(dt).contiguous(memory_format=torch.channels_last)
      conv = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False).to(dt).to(
          memory_format=torch.channels_last)
      gflop = 2 * batch * (size // stride) ** 2 * cin * cout * 9 / 1e9
      xg = x.clone().requires_grad_(True)

      def fwd():
        with torch.no_grad():
          conv(x)

      def both():
        conv.zero_grad()
        conv(xg).sum().backward()

      t_fwd, t_all = median_ms(fwd, reps), median_ms(both, reps)
      print(f'torch {dtype:8s} {name:17s} fwd {gflop / t_fwd * 1e3:4.0f}  '
            f'dx+dw {2 * gflop / (t_all - t_fwd) * 1e3:4.0f} GFLOP/s', flush=True)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--reps', type=int, default=10)
  parser.add_argument('--xla-flags', default='', help='appended to XLA_FLAGS')
  parser.add_argument('--torch', action='store_true', help='PyTorch channels-last instead')
  args = parser.parse_args()
  dtypes = [{'fp32': 'float32', 'bf16': 'bfloat16'}.get(d, d) for d in args.dtypes.split(',')]
  if args.torch:
    torch_rows(dtypes, args.batch, args.reps)
    return 0
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from cnnlab import parallel  # the XLA:CPU flags cnnlab runs with, unless --xla-flags sets them
  parallel.fast_cpu_flags()
  print(f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}, batch {args.batch}")
  jax_rows(dtypes, args.batch, args.reps)
  return 0


if __name__ == '__main__':
  sys.exit(main())
