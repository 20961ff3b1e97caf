"""Throughput of the data pipelines, in images per second (a benchmark, never a test).

  python bench/bench_data.py                       # all sets, both pipelines
  python bench/bench_data.py --sets mnist5k --steps 200 --json out.json

For each set it times
  device        the jitted draw of batch k (permutation, gather) plus the on-device augmentation
                and normalisation the matching experiment uses, so the figure is what the train
                step pays for its input; compare it with the step's own images/s.
  grain/wN      the host pipeline with N worker processes, up to global jax.Arrays on the devices.
Sets: mnist5k (28x28x1), shapes at 64x64x3 and an ImageNet-sized mock: JPEG 500x375 records
decoded with PIL and resized to 224x224 on the host (what `imagenet2012` costs), for grain; the
device row for that size uses `synthetic` 224x224 images already in device memory.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cnnlab.data as data  # noqa: E402
from cnnlab.data import augment, config  # noqa: E402


class JpegSource:
  """`n` ImageNet-like records: 500x375 JPEGs (64 distinct ones, cycled), decoded on access the
  way a TFDS data source decodes its Image feature."""

  def __init__(self, n: int, height: int = 375, width: int = 500, distinct: int = 64):
    rng = np.random.default_rng(0)
    self.n = n
    self.blobs = []
    for _ in range(distinct):  # smooth noise plus grain: compresses like a photo, not like noise
      small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
      image = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))
      image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
      buffer = io.BytesIO()
      Image.fromarray(image).save(buffer, format='JPEG', quality=90)
      self.blobs.append(buffer.getvalue())

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    image = np.asarray(Image.open(io.BytesIO(self.blobs[i % len(self.blobs)])).convert('RGB'))
    return {'image': image, 'label': np.int64(i % 1000)}

  def __getitems__(self, indices):
    return [self[int(i)] for i in indices]


def cifar_style_augment():
  cfg = config.augment_config()
  cfg.crop_padding, cfg.flip = 4, 'random'
  return cfg


def time_device(pipe, aug_cfg, steps: int) -> float:
  """Images/s of drawing, augmenting and normalising batches inside one jitted function."""
  draw = pipe.batch_fn()
  mean, std = pipe.info.mean, pipe.info.std

  @jax.jit
  def step_input(arrays, step, key):
    batch = augment.apply(aug_cfg, jax.random.fold_in(key, step), draw(arrays, step))
    return augment.normalize(batch['image'], mean, std, jnp.bfloat16), batch['label']

  key = jax.random.PRNGKey(0)
  jax.block_until_ready(step_input(pipe.arrays, jnp.int32(0), key))  # compile
  start = time.perf_counter()
  for step in range(steps):
    out = step_input(pipe.arrays, jnp.int32(step), key)
  jax.block_until_ready(out)
  return steps * pipe.batch_size / (time.perf_counter() - start)


def time_grain(pipe, steps: int, warmup: int = 3) -> float:
  stream = pipe.iterate(0)
  for _ in range(warmup):  # worker start-up and the first prefetch
    jax.block_until_ready(next(stream))
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(stream)
  jax.block_until_ready(batch)
  elapsed = time.perf_counter() - start
  stream.close()
  return steps * pipe.batch_size / elapsed


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sets', default='mnist5k,shapes64,imagenet_mock')
  parser.add_argument('--steps', type=int, default=100, help='timed batches per measurement')
  parser.add_argument('--grain-steps', type=int, default=20, help='timed batches for grain on '
                      'the ImageNet-sized mock (slow on few cores)')
  parser.add_argument('--workers', default='0,2', help='grain worker counts to time')
  parser.add_argument('--data-dir', default=None, help='default: a temporary directory')
  parser.add_argument('--json', default=None, help='also write the results here')
  args = parser.parse_args(argv)

  data_dir = args.data_dir or tempfile.mkdtemp(prefix='cnnlab-bench-')
  mesh = jax.make_mesh((len(jax.devices()),), ('data',))
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  workers = [int(w) for w in args.workers.split(',')]
  print(f'devices: {len(jax.devices())} x {jax.devices()[0].device_kind}; host cores: '
        f'{os.cpu_count()}; data_dir: {data_dir}')
  results = []

  def report(name, pipeline, batch, rate):
    results.append({'set': name, 'pipeline': pipeline, 'batch': batch, 'images_per_s': rate})
    print(f'{name:15s} {pipeline:10s} batch {batch:4d} {rate:12,.0f} images/s', flush=True)

  sets = {
      'mnist5k': dict(name='mnist5k', batch=128, kw={}, aug=config.augment_config()),
      'shapes64': dict(name='shapes', batch=128, aug=cifar_style_augment(),
                       kw=dict(resolution=64, num_classes=4, num_train=10_000, num_test=2_000)),
  }
  for label in args.sets.split(','):
    if label in sets:
      s = sets[label]
      dev = data.DevicePipeline.create(s['name'], 'train', batch_size=s['batch'], seed=0,
                                       sharding_replicated=replicated,
                                       sharding_batch=batch_sharding, data_dir=data_dir, **s['kw'])
      report(label, 'device', s['batch'], time_device(dev, s['aug'], args.steps))
      for w in workers:
        g = data.GrainPipeline.create(s['name'], 'train', batch_size=s['batch'], seed=0,
                                      sharding_batch=batch_sharding, data_dir=data_dir,
                                      num_workers=w, **s['kw'])
        report(label, f'grain/w{w}', s['batch'], time_grain(g, args.steps))
    elif label == 'imagenet_mock':
      batch = 64
      kw = dict(image_shape=(224, 224, 3), num_classes=1000, num_examples=512)
      dev = data.DevicePipeline.create('synthetic', 'train', batch_size=batch, seed=0,
                                       sharding_replicated=replicated,
                                       sharding_batch=batch_sharding, **kw)
      aug = config.augment_config()
      aug.flip = 'random'
      report('imagenet224', 'device', batch, time_device(dev, aug, args.steps))
      source = JpegSource(100_000)
      info = data.DatasetInfo(name='imagenet_mock', num_classes=1000, image_shape=(224, 224, 3),
                              splits={'train': len(source)}, mean=(0.5,) * 3, std=(0.25,) * 3)
      for w in workers:
        g = data.GrainPipeline.from_source(source, info, 'train', batch_size=batch, seed=0,
                                           sharding_batch=batch_sharding, num_workers=w,
                                           image_size=224)
        report('imagenet224', f'grain/w{w}', batch, time_grain(g, args.grain_steps))
    else:
      parser.error(f'unknown set {label!r}; choose from mnist5k, shapes64, imagenet_mock')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
