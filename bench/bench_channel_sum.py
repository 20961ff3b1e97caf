"""Per-channel sums of a channels-last array: XLA's reduction against cnnlab's `channel_sum`.

  python bench/bench_channel_sum.py                    # the shapes of ResNet-18/50's batch norms
  python bench/bench_channel_sum.py --shapes 8x28x28x512,128x32x32x64 --repeats 20

Batch norm needs, per channel, sums over batch, height and width (the statistics; the gradient's
sum of g and of g * x). This times, in milliseconds under `jax.jit` (median of --repeats calls),
for each shape:

  reduce      jnp.sum(x, axis=(0, 1, 2))                          XLA's reduction
  reduce2     jnp.sum(x * relu(y * s + 1), axis=(0, 1, 2))         a fused producer, as in autodiff
  channel_sum layers.channel_sum(x)                                a matrix-vector product on CPU
  dot2        layers.channel_sum(x * relu(y * s + 1))              the same producer, materialised
  elementwise x * relu(y * s + 1)                                  the producer alone (memory bound)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

DEFAULT_SHAPES = '128x32x32x64,128x16x16x128,32x112x112x64,8x56x56x256,8x28x28x512,8x14x14x1024'


def time_ms(fn, *args, repeats: int) -> float:
  import jax
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - started)
  return statistics.median(times) * 1e3


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shapes', default=DEFAULT_SHAPES, help='comma list of BxHxWxC')
  parser.add_argument('--repeats', type=int, default=10)
  args = parser.parse_args(argv)
  from cnnlab import parallel
  parallel.fast_cpu_flags()
  import jax
  import jax.numpy as jnp
  from cnnlab import layers
  axes = (0, 1, 2)
  producer = lambda x, y, s: x * jnp.maximum(y * s + 1.0, 0.0)  # noqa: E731
  cases = {
      'reduce': lambda x, y, s: jnp.sum(x, axis=axes),
      'reduce2': lambda x, y, s: jnp.sum(producer(x, y, s), axis=axes),
      'channel_sum': lambda x, y, s: layers.channel_sum(x),
      'dot2': lambda x, y, s: layers.channel_sum(producer(x, y, s)),
      'elementwise': producer,
  }
  print(f'backend {jax.default_backend()}; ms per call, median of {args.repeats}')
  print(f'{"shape":>16s} {"MB":>5s} ' + ' '.join(f'{name:>11s}' for name in cases))
  for text in args.shapes.split(','):
    shape = tuple(int(v) for v in text.split('x'))
    if len(shape) != 4:
      raise SystemExit(f'--shapes: {text!r} is not BxHxWxC')
    keys = jax.random.split(jax.random.key(0), 3)
    x, y = jax.random.normal(keys[0], shape), jax.random.normal(keys[1], shape)
    s = jax.random.normal(keys[2], shape[-1:])
    row = [time_ms(fn, x, y, s, repeats=args.repeats) for fn in cases.values()]
    print(f'{text:>16s} {x.nbytes / 1e6:5.0f} ' + ' '.join(f'{ms:11.2f}' for ms in row))
  return 0


if __name__ == '__main__':
  sys.exit(main())
