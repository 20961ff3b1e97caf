"""One training step on several devices against one device, and both against float64.

  python bench/parallel_equivalence.py                       # every case below, 4 CPU devices
  python bench/parallel_equivalence.py --cases quickstart,resnet20_shapes --devices 2

Data parallelism must compute one device's step on the same global batch. For each case this takes
one step of the real train step (`cnnlab.train.loop.setup`, `Run.compile_train`: augmentation,
batch norm over the global batch, the optimizer) on 1 device, on N devices under `jit` over a mesh
and under `pmap`, and the same step in float64 (`jax_enable_x64`, parameters, inputs and model in
float64, on the float32 step's augmented batch). It prints, per case:

  grad_norm        the step's gradient norm on 1 device, and its relative difference on N (jit, pmap)
  N vs 1           the worst parameter tensor after the step: max |a - b| / max |b|
  vs float64       the same measure of each float32 result against the float64 step
  grad_norm vs f64 each float32 gradient norm's relative difference from the float64 step's

What is left after a correct step is rounding: the N-device results are no farther from float64
than the 1-device result is. No timing: the figures are differences, not speeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = ["data.name='shapes'", 'data.shapes.num_train=256', 'data.shapes.num_test=64',
          "data.train_split='train'", "data.eval_split='test'",
          "data.pipeline='device'", 'data.image_size=None']
# Case -> (experiment file, overrides). The first ones are variations of the quickstart, where a
# data-parallel bug first showed; the rest is one step of every shipped experiment, on `shapes`
# where its own dataset is not on the machine. Experiments that train with Adam take SGD here:
# Adam's first update is about lr * sign(g), which turns the rounding noise of a nearly-zero
# gradient entry into a full-size update of either sign. Dropout is off where a case is compared
# with float64, whose random bits differ.
CASES = {
    'quickstart': ('quickstart', ['train.batch_size=128']),
    'quickstart_norm_none': ('quickstart', ['train.batch_size=128', "model.norm='none'"]),
    'quickstart_digits': ('quickstart', ['train.batch_size=128', "data.name='digits'"]),
    'quickstart_avg_pool': ('quickstart', ['train.batch_size=128', "model.pool=('none','avg','avg')"]),
    'quickstart_no_augment': ('quickstart', ['train.batch_size=128', 'data.augment.translate=0',
                                             'data.augment.rotate=0.0', 'data.augment.scale=0.0']),
    'quickstart_no_pool': ('quickstart', ['train.batch_size=128', "model.pool='none'",
                                          'model.stride=2']),
    'simple_cnn_mnist5k': ('simple_cnn_mnist5k', ['train.batch_size=128', "optim.name='sgd'"]),
    'resnet20_shapes': ('resnet20_shapes', ['train.batch_size=32']),
    'googlenet_shapes': ('googlenet_shapes', ['train.batch_size=16', 'data.shapes.resolution=64',
                                              'data.shapes.num_train=256', 'data.shapes.num_test=64',
                                              "optim.name='sgd'", 'model.dropout=0.0',
                                              'model.aux_dropout=0.0']),
    'cifar10_resnet18': ('cifar10_resnet18', ['train.batch_size=32', *SHAPES,
                                              'data.shapes.resolution=32', 'model.num_classes=None']),
    'imagenet_resnet50': ('imagenet_resnet50', ['train.batch_size=16', *SHAPES,
                                                'data.shapes.resolution=64', 'model.num_classes=None',
                                                'data.augment.crop_padding=4', "dtype='float32'"]),
    'ablation_kernel_stride_pool': ('ablation_kernel_stride_pool', ['train.batch_size=128']),
    'ablation_kernel_stride_pool_shapes': ('ablation_kernel_stride_pool_shapes',
                                           ['train.batch_size=32']),
}


def load_config(experiment: str, overrides, *, strategy: str = 'jit', devices: int = 1):
  """The experiment's config for one step on `devices` devices (quiet, no cache, no files)."""
  from cnnlab import config as config_lib
  return config_lib.load(os.path.join(ROOT, 'experiments', f'{experiment}.py'), [
      *overrides, 'train.num_steps=1', "log.progress='none'", "compilation_cache_dir=''",
      f"parallel.strategy='{strategy}'", f'parallel.num_devices={devices}'])


def one_step(config):
  """(state after, metrics) of the config's first training step, the state as one logical copy on
  the host."""
  import jax
  from cnnlab import parallel
  from cnnlab.train import loop
  run = loop.setup(config)
  state = run.par.place_state(run.initial_state())  # (donated to the step)
  first = None if run.train_data.kind == 'device' else next(iter(run.train_data.iterate(0)))
  train_fn, data_arg = run.compile_train(state, first)
  after, metrics = train_fn(state, first if data_arg is None else data_arg)
  return jax.device_get(run.par.unreplicate(after)), parallel.fetch(metrics)


def float64_step(config):
  """Parameters after the config's first step computed in float64, on one device: the float32
  step's augmented, normalised batch, with the state and the model in float64."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from cnnlab.train import loop, step as step_lib
  config = config.copy_and_resolve_references()
  with config.parallel.unlocked():
    config.parallel.num_devices, config.parallel.strategy = 1, 'jit'
  run = loop.setup(config)
  state = run.initial_state()
  batch = (run.train_data.batch(0) if run.train_data.kind == 'device'
           else next(iter(run.train_data.iterate(0))))
  images, batch = jax.device_get(jax.jit(
      lambda s, b: step_lib.preprocess(s, b, run.settings))(state, batch))
  state = jax.device_get(state)
  previous = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  try:
    wide = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: np.asarray(x, np.float64) if np.asarray(x).dtype == np.float32 else x, tree)
    model = run.model
    if 'dtype' in getattr(model, '__dataclass_fields__', {}):
      model = model.clone(dtype=jnp.float64)
    settings = dataclasses.replace(run.settings, model=model, compute_dtype=jnp.float64)
    update = step_lib.make_update(settings)
    with jax.numpy_dtype_promotion('standard'):  # x64's int64 argmax meets int32 labels
      after, metrics = jax.jit(update)(wide(state), np.asarray(images, np.float64), batch)
    return jax.device_get(after.params), float(metrics['grad_norm'])
  finally:
    jax.config.update('jax_enable_x64', previous)


def worst_difference(a, b) -> tuple[float, str]:
  """(max |a - b| / max |b|, its tensor's path) over the worst tensor of two parameter trees."""
  import jax
  import numpy as np
  rows = []
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = np.max(np.abs(y)) or 1.0
    rows.append((float(np.max(np.abs(x - y)) / scale), '/'.join(str(k.key) for k in path)))
  return max(rows, default=(0.0, ''))


def measure(name: str, devices: int, extra=()) -> dict:
  experiment, overrides = CASES[name]
  overrides = [*overrides, *extra]
  one, m1 = one_step(load_config(experiment, overrides))
  result = {'case': name, 'loss': m1['loss'], 'grad_norm': m1['grad_norm']}
  p64, gn64 = float64_step(load_config(experiment, overrides))
  result['grad_norm_f64'] = gn64
  result['one_vs_f64'] = worst_difference(one.params, p64)
  result['grad_norm_f64_rel'] = abs(m1['grad_norm'] - gn64) / gn64
  for strategy in ('jit', 'pmap'):
    many, mn = one_step(load_config(experiment, overrides, strategy=strategy, devices=devices))
    result[f'{strategy}_grad_norm_rel'] = abs(mn['grad_norm'] - m1['grad_norm']) / m1['grad_norm']
    result[f'{strategy}_grad_norm_f64_rel'] = abs(mn['grad_norm'] - gn64) / gn64
    result[f'{strategy}_vs_one'] = worst_difference(many.params, one.params)
    result[f'{strategy}_vs_f64'] = worst_difference(many.params, p64)
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', default=','.join(CASES), help=f'comma list of: {", ".join(CASES)}')
  parser.add_argument('--devices', type=int, default=4, help='CPU devices of the parallel runs')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='a config override added to every case')
  args = parser.parse_args(argv)
  unknown = [c for c in args.cases.split(',') if c not in CASES]
  if unknown:
    parser.error(f'unknown case(s) {unknown}; known: {", ".join(CASES)}')
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={args.devices}').strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  from cnnlab import parallel
  parallel.patient_cpu_collectives()
  parallel.fast_cpu_flags()
  print(f'{"case":36s} {"grad_norm":>10s} {"jit":>8s} {"pmap":>8s} | {"worst param, N vs 1":>19s} '
        f'{"":>8s} | {"vs float64: 1":>13s} {"jit":>8s} {"pmap":>8s} | {"grad_norm vs f64: 1":>19s} '
        f'{"jit":>8s} {"pmap":>8s}  worst tensor (N vs 1)')
  for name in args.cases.split(','):
    r = measure(name, args.devices, args.set)
    print(f'{name:36s} {r["grad_norm"]:10.6f} {r["jit_grad_norm_rel"]:8.1e} '
          f'{r["pmap_grad_norm_rel"]:8.1e} | jit {r["jit_vs_one"][0]:8.1e} pmap '
          f'{r["pmap_vs_one"][0]:8.1e} | {r["one_vs_f64"][0]:13.1e} {r["jit_vs_f64"][0]:8.1e} '
          f'{r["pmap_vs_f64"][0]:8.1e} | {r["grad_norm_f64_rel"]:19.1e} '
          f'{r["jit_grad_norm_f64_rel"]:8.1e} {r["pmap_grad_norm_f64_rel"]:8.1e}  '
          f'{max(r["jit_vs_one"], r["pmap_vs_one"])[1]}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
