"""Reproduces (or rules out) the XLA:CPU collective deadlock of several devices in one process.

  python bench/stress_collectives.py --devices 8 --steps 2000               # cnnlab's pool sizing
  python bench/stress_collectives.py --devices 8 --steps 2000 --pool-threads 2   # XLA's default here

A small conv net with a batch-norm-like cross-device mean is trained and evaluated alternately,
batch sharded over the devices, so every program holds several all-reduces. With the default pool
(one thread per core) it deadlocks within seconds on a 2-core host; XLA then aborts after the
rendezvous timeout (`--timeout`, seconds) and this script exits non-zero. Prints steps/s on success.
"""

import argparse
import os
import sys
import time


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--steps', type=int, default=2000)
  parser.add_argument('--pool-threads', type=int, default=0,
                      help='PJRT_NPROC; 0 = cnnlab.parallel.cpu_pool_threads(devices)')
  parser.add_argument('--timeout', type=int, default=30, help='XLA rendezvous timeout, seconds')
  parser.add_argument('--sync', action='store_true', help='synchronous CPU dispatch')
  args = parser.parse_args()

  os.environ['XLA_FLAGS'] = ' '.join([
      os.environ.get('XLA_FLAGS', ''),
      f'--xla_force_host_platform_device_count={args.devices}',
      f'--xla_cpu_collective_call_terminate_timeout_seconds={args.timeout}',
      f'--xla_cpu_collective_timeout_seconds={args.timeout}'])
  from cnnlab import parallel
  threads = args.pool_threads or parallel.cpu_pool_threads(args.devices)
  os.environ['PJRT_NPROC'] = str(threads)

  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  jax.config.update('jax_cpu_enable_async_dispatch', not args.sync)

  mesh = Mesh(jax.devices(), ('data',))
  replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))

  def net(kernels, x):
    for k in kernels:
      x = jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      x = jax.nn.relu(x - x.mean((0, 1, 2)))  # the mean over the sharded batch: an all-reduce
    return x.mean((1, 2, 3))

  @jax.jit
  def train(kernels, x):
    loss, grads = jax.value_and_grad(lambda k: net(k, x).mean())(kernels)
    return jax.tree.map(lambda k, g: k - 1e-3 * g, kernels, grads), loss

  @jax.jit
  def evaluate(kernels, x):
    return net(kernels, x).sum()

  key = jax.random.key(0)
  kernels = [jax.device_put(0.1 * jax.random.normal(key, (3, 3, c, 16)), replicated)
             for c in (3, 16, 16)]
  x = jax.device_put(jnp.ones((8 * args.devices, 16, 16, 3)), batch)
  print(f'{args.devices} devices, pool of {threads} threads, '
        f'{"sync" if args.sync else "async"} dispatch', flush=True)
  start = time.perf_counter()
  for step in range(args.steps):
    kernels, loss = train(kernels, x)
    if step % 5 == 0:
      evaluate(kernels, x)
  jax.block_until_ready(loss)
  elapsed = time.perf_counter() - start
  print(f'ok: {args.steps} steps in {elapsed:.1f} s ({args.steps / elapsed:.0f} steps/s)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
