"""Training throughput of cnnlab's real train step against PyTorch twins (a benchmark, never a test).

  python bench/bench_train.py                                  # the whole suite (slow on CPU)
  python bench/bench_train.py --models resnet18_cifar --dtypes fp32 --peers cnnlab,torch_cl
  python bench/bench_train.py --quick --models simple_cnn      # smoke run: 3 timed steps a row
  python bench/bench_train.py --models resnet18_cifar --peers cnnlab --cpu-devices 1,2,4

Every row (model x dtype x peer) runs in its own subprocess, so its peak memory is that process's
own (max RSS on CPU; the device's peak bytes in use on GPU) and its XLA flags and thread settings
are its own. A row reports images/s = batch / median step time over --steps timed steps after
--warmup untimed ones (each step waited for), compile seconds, and peak MiB.

cnnlab  the step `cnnlab train` runs: `cnnlab.train.loop.setup(config)` on the model's experiment
        file with the overrides below (dataset `synthetic`, device pipeline: the batch is drawn,
        normalised and cast inside the one jitted step), `Run.compile_train` (which compiles).
        Compile s = trace + lower + compile, as train_and_evaluate's compile_time_s.
torch_nchw / torch_cl
        the torchvision-structured twin in bench/torch_models.py, eager, NCHW or channels-last.
torch_compile
        the twin under `torch.compile` (inductor), channels-last; compile s = its first step.
Both sides: SGD momentum 0.9 (no Nesterov, no weight decay, constant lr), mean cross-entropy over
integer labels, the same batch, uint8 images normalised inside the step, no augmentation, no label
smoothing; bf16 is cnnlab's dtype='bfloat16' (float32 parameters) vs torch autocast (CPU) / AMP
(GPU) to bfloat16. GoogLeNet runs without its auxiliary heads on both sides (aux_logits=False).
The parameter counts of the two sides are asserted equal (the counts are in MODELS).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
PEERS = ('cnnlab', 'torch_nchw', 'torch_cl', 'torch_compile')
DTYPE_ALIASES = {'fp32': 'float32', 'float32': 'float32', 'bf16': 'bfloat16', 'bfloat16': 'bfloat16'}
LEARNING_RATE = 0.01  # both sides; small enough that random labels never diverge in a few steps
MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True)
class Arch:
  """One benchmarked architecture: cnnlab's experiment and model, and its torch twin."""
  experiment: str  # relative to the repository root
  model: str  # cnnlab's registered name = the twin's name in torch_models
  input_shape: tuple[int, int, int]  # H, W, C
  num_classes: int
  batch_cpu: int
  batch_gpu: int
  params: int  # cnnlab's count (tests/test_bench.py checks it and the twin's)
  model_overrides: tuple[str, ...] = ()  # cnnlab config keys
  torch_kwargs: tuple[tuple[str, object], ...] = ()


MODELS = {
    'simple_cnn': Arch('experiments/simple_cnn_mnist5k.py', 'simple_cnn', (28, 28, 1), 10, 128, 128,
                       6_872, torch_kwargs=(('in_channels', 1), ('input_size', 28))),
    'resnet18_cifar': Arch('experiments/cifar10_resnet18.py', 'resnet18', (32, 32, 3), 10, 128, 128,
                           11_173_962, torch_kwargs=(('stem', 'cifar'),)),
    'resnet50': Arch('experiments/imagenet_resnet50.py', 'resnet50', (224, 224, 3), 1000, 32, 256,
                     25_557_032, torch_kwargs=(('zero_init_last', True),)),
    'googlenet': Arch('experiments/googlenet_shapes.py', 'googlenet', (224, 224, 3), 1000, 32, 256,
                      6_624_904, model_overrides=('model.aux_logits=False',),
                      torch_kwargs=(('aux_logits', False),)),
}


def cnnlab_overrides(arch: Arch, *, dtype: str, batch: int, steps: int, cpu_devices: int) -> list[str]:
  """The `--config.` overrides that turn the experiment into the benchmarked step."""
  return [
      f'dtype={dtype!r}', f'train.batch_size={batch}', f'train.num_steps={steps}',
      "data.name='synthetic'", "data.train_split='train'", "data.eval_split='test'",
      f'data.synthetic.image_shape={tuple(arch.input_shape)}',
      f'data.synthetic.num_classes={arch.num_classes}',
      f'data.synthetic.num_examples={4 * batch}', "data.pipeline='device'", 'data.image_size=None',
      "data.augment.flip='none'", 'data.augment.crop_padding=0', 'data.augment.translate=0',
      'data.augment.rotate=0.0', 'data.augment.cutout=0', 'data.augment.mixup_alpha=0.0',
      'data.augment.cutmix_alpha=0.0', 'train.label_smoothing=0.0',
      "optim.name='sgd'", f'optim.learning_rate={LEARNING_RATE}', f'optim.momentum={MOMENTUM}',
      'optim.nesterov=False', 'optim.weight_decay=0.0', "optim.schedule='constant'",
      'optim.warmup_epochs=0.0', 'optim.clip_norm=0.0', 'optim.ema_decay=0.0',
      f'parallel.cpu_devices={cpu_devices}', "compilation_cache_dir=''",
      *arch.model_overrides,
  ]


# ---------------------------------------------------------------------------------------------
# Child processes: one measured row each. They print nothing the parent parses; the result goes
# to spec['result_path'] as JSON.

def _rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _timing(times: list[float], warmup: int, batch: int) -> dict:
  timed = times[warmup:]
  median = statistics.median(timed)
  return {'images_per_s': batch / median, 'step_s_median': median, 'step_s_min': min(timed),
          'step_s_max': max(timed), 'step_times_s': times, 'first_step_s': times[0]}


def child_cnnlab(spec: dict) -> dict:
  import jax
  from cnnlab import config as config_lib, parallel
  config = config_lib.load(os.path.join(ROOT, spec['experiment']), spec['overrides'])
  applied = parallel.configure_cpu_devices(config.parallel.cpu_devices)
  from cnnlab.train.loop import setup
  rss_import = _rss_mib()
  started = time.perf_counter()
  run = setup(config)
  state = run.par.place_state(run.initial_state())
  params = run.par.unreplicate(state.params)
  num_params = int(sum(x.size for x in jax.tree.leaves(params)))
  if num_params != spec['expected_params']:
    raise AssertionError(f"cnnlab {spec['model']}: {num_params:,} parameters, the benchmark "
                         f"expects {spec['expected_params']:,} (update MODELS or the model)")
  setup_s = time.perf_counter() - started
  t = time.perf_counter()
  train_fn, data_arg = run.compile_train(state)  # compiles ahead, under jit and pmap
  compile_s = time.perf_counter() - t
  times, losses = [], []
  for _ in range(spec['warmup'] + spec['steps']):
    t = time.perf_counter()
    state, metrics = train_fn(state, data_arg)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
    losses.append(float(jax.numpy.mean(metrics['loss'])))
  devices = list(run.par.mesh.devices.flat)
  out = {'num_params': num_params, 'compile_s': compile_s, 'setup_s': setup_s,
         'losses': losses, 'num_devices': len(devices), 'cpu_devices_applied': applied,
         'backend': jax.default_backend(), 'device_kind': devices[0].device_kind,
         'jax_version': jax.__version__, 'strategy': run.par.strategy,
         'rss_after_import_mib': rss_import, 'xla_flags': os.environ.get('XLA_FLAGS', '')}
  out.update(_timing(times, spec['warmup'], spec['batch']))
  if jax.default_backend() == 'cpu':
    out.update(peak_mib=_rss_mib(), peak_kind='max_rss')
  else:
    peaks = [(d.memory_stats() or {}).get('peak_bytes_in_use', 0) for d in devices]
    out.update(peak_mib=sum(peaks) / 2**20, peak_kind='device_peak_bytes_in_use',
               host_peak_mib=_rss_mib())
  return out


def child_torch(spec: dict) -> dict:
  import torch
  import torch.nn.functional as F
  sys.path.insert(0, BENCH_DIR)
  import torch_models
  peer = spec['peer']
  device = 'cuda' if spec['device'] == 'gpu' else 'cpu'
  if device == 'cuda' and not torch.cuda.is_available():
    raise RuntimeError(f'--device gpu but this torch ({torch.__version__}) sees no CUDA device')
  if spec['torch_threads']:
    torch.set_num_threads(spec['torch_threads'])
  rss_import = _rss_mib()
  torch.manual_seed(0)
  model = torch_models.create(spec['model'], num_classes=spec['num_classes'],
                              **dict(spec['torch_kwargs']))
  num_params = torch_models.count_params(model)
  if num_params != spec['expected_params']:
    raise AssertionError(f"torch twin of {spec['model']}: {num_params:,} parameters, cnnlab's "
                         f"has {spec['expected_params']:,}")
  memory_format = torch.contiguous_format if peer == 'torch_nchw' else torch.channels_last
  model = model.to(device=device, memory_format=memory_format).train()
  h, w, c = spec['input_shape']
  batch = spec['batch']
  gen = torch.Generator().manual_seed(0)
  images = torch.randint(0, 256, (batch, c, h, w), dtype=torch.uint8, generator=gen)
  images = images.to(device).contiguous(memory_format=memory_format)
  labels = torch.randint(0, spec['num_classes'], (batch,), generator=gen).to(device)
  mean, std = 127.5 / 255.0, 0.2887  # the synthetic set's, as cnnlab normalises it
  optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
  forward = torch.compile(model) if peer == 'torch_compile' else model
  bf16 = spec['dtype'] == 'bfloat16'

  def step():
    x = (images.float() / 255.0 - mean) / std  # elementwise ops keep the memory format
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      logits = forward(x)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss

  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  times, losses = [], []
  for _ in range(spec['warmup'] + spec['steps']):
    t = time.perf_counter()
    loss = step()
    if device == 'cuda':
      torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
    losses.append(float(loss))
  out = {'num_params': num_params, 'losses': losses, 'torch_version': torch.__version__,
         'torch_threads': torch.get_num_threads(), 'memory_format': str(memory_format),
         'compile_s': times[0] if peer == 'torch_compile' else None,
         'backend': device, 'rss_after_import_mib': rss_import,
         'device_kind': torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}
  out.update(_timing(times, spec['warmup'], batch))
  if device == 'cuda':
    out.update(peak_mib=torch.cuda.max_memory_allocated() / 2**20, peak_kind='max_memory_allocated',
               host_peak_mib=_rss_mib())
  else:
    out.update(peak_mib=_rss_mib(), peak_kind='max_rss')
  return out


def child_main(spec_path: str) -> int:
  with open(spec_path, encoding='utf-8') as f:
    spec = json.load(f)
  load_before = os.getloadavg()[0]
  result = (child_cnnlab if spec['peer'] == 'cnnlab' else child_torch)(spec)
  result.update(load_before=load_before, load_after=os.getloadavg()[0])
  with open(spec['result_path'], 'w', encoding='utf-8') as f:
    json.dump(result, f)
  return 0


# ---------------------------------------------------------------------------------------------
# The parent: plans the rows, runs one subprocess each, prints the table and writes the JSON.

def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def detect_device() -> str:
  """'gpu' when nvidia-smi lists a GPU, else 'cpu' (without starting JAX or torch here)."""
  if shutil.which('nvidia-smi'):
    try:
      out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=30)
      if out.returncode == 0 and 'GPU' in out.stdout:
        return 'gpu'
    except (OSError, subprocess.TimeoutExpired):
      pass
  return 'cpu'


def child_env(peer: str, device: str, xla_flags: str) -> dict:
  env = dict(os.environ)
  if peer == 'cnnlab':
    # The device split is the row's parallel.cpu_devices; drop an inherited forced count (tests
    # set one), as `cnnlab train` would otherwise keep it.
    kept = [f for f in env.get('XLA_FLAGS', '').split()
            if not f.startswith('--xla_force_host_platform_device_count')]
    env['XLA_FLAGS'] = ' '.join(kept + xla_flags.split())
    if device == 'cpu':
      env['JAX_PLATFORMS'] = 'cpu'
    else:
      env.pop('JAX_PLATFORMS', None)
  elif device == 'cpu':
    env['CUDA_VISIBLE_DEVICES'] = ''
  env['PYTHONPATH'] = os.pathsep.join([ROOT, *filter(None, [env.get('PYTHONPATH')])])
  return env


def run_row(spec: dict, env: dict, timeout: float) -> dict:
  with tempfile.TemporaryDirectory(prefix='cnnlab-bench-') as tmp:
    spec = {**spec, 'result_path': os.path.join(tmp, 'result.json')}
    if spec['peer'] == 'torch_compile':  # a cold inductor cache, as cnnlab's rows compile cold
      env = {**env, 'TORCHINDUCTOR_CACHE_DIR': os.path.join(tmp, 'inductor')}
    spec_path = os.path.join(tmp, 'spec.json')
    with open(spec_path, 'w', encoding='utf-8') as f:
      json.dump(spec, f)
    started = time.perf_counter()
    try:
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', spec_path],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
      rc, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
      rc, stderr = None, f'timed out after {timeout:.0f}s\n{e.stderr or ""}'
    wall = time.perf_counter() - started
    if rc == 0 and os.path.exists(spec['result_path']):
      with open(spec['result_path'], encoding='utf-8') as f:
        return {'ok': True, 'wall_s': wall, **json.load(f)}
    tail = '\n'.join((stderr if isinstance(stderr, str) else '').strip().splitlines()[-15:])
    return {'ok': False, 'wall_s': wall, 'returncode': rc, 'error': tail}


def parse_batch(text: str | None, models: list[str]) -> dict[str, int]:
  """'64' (every model) or 'resnet50=64,googlenet=48'."""
  if not text:
    return {}
  if '=' not in text:
    return {m: int(text) for m in models}
  out = {}
  for item in text.split(','):
    name, _, value = item.partition('=')
    if name not in MODELS:
      raise SystemExit(f'--batch: unknown model {name!r}; choose from {", ".join(MODELS)}')
    out[name] = int(value)
  return out


def split_list(text: str, choices, what: str, aliases=None) -> list[str]:
  out = []
  for item in filter(None, text.split(',')):
    item = (aliases or {}).get(item, item)
    if item not in choices:
      raise SystemExit(f'--{what}: unknown {item!r}; choose from {", ".join(choices)}')
    out.append(item)
  return out


def fmt(value, spec: str, missing: str = '-') -> str:
  return missing if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
  header = (f'{"model":15s} {"input":>11s} {"batch":>5s} {"dtype":8s} {"peer":15s} '
            f'{"images/s":>9s} {"compile s":>9s} {"peak MiB":>9s} {"cnnlab/peer":>11s}')
  print(header)
  print('-' * len(header))
  for r in rows:
    peer = r['peer']
    if peer == 'cnnlab' and r['device'] == 'cpu':  # the CPU device split it ran with
      peer += f'/d{r["num_devices"]}' if r['ok'] else f'/cpu_devices={r["cpu_devices"]}'
    head = (f'{r["model"]:15s} {"x".join(map(str, r["input_shape"])):>11s} {r["batch"]:5d} '
            f'{r["dtype"]:8s} {peer:15s} ')
    if not r['ok']:
      first = (r['error'].splitlines() or ['?'])[-1]
      print(head + f'FAILED: {first[:120]}')
      continue
    print(head + f'{r["images_per_s"]:9.1f} {fmt(r["compile_s"], "9.1f"):>9s} '
          f'{r["peak_mib"]:9.0f} {fmt(r.get("ratio_cnnlab_over_peer"), "11.2f"):>11s}')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default=','.join(MODELS), help=f'from {", ".join(MODELS)}')
  parser.add_argument('--dtypes', default='float32,bfloat16', help='float32/fp32, bfloat16/bf16')
  parser.add_argument('--peers', default=','.join(PEERS), help=f'from {", ".join(PEERS)}')
  parser.add_argument('--steps', type=int, default=10, help='timed steps per row (median taken)')
  parser.add_argument('--warmup', type=int, default=3, help='untimed steps before them')
  parser.add_argument('--batch', default=None,
                      help="global batch for every model ('64') or per model ('resnet50=64,...'); "
                      'default: 128 for simple_cnn and resnet18_cifar, 32 (CPU) / 256 (GPU) at 224')
  parser.add_argument('--quick', action='store_true', help='smoke run: --steps 3 --warmup 1')
  parser.add_argument('--cpu-devices', default='1',
                      help="cnnlab's parallel.cpu_devices (1 = cnnlab's default, 0 = one per core); "
                      'a comma list gives one cnnlab row per value, to compare the lever')
  parser.add_argument('--override', action='append', default=[], metavar='KEY=VALUE',
                      help='extra cnnlab config override (as --config.KEY=VALUE), last wins')
  parser.add_argument('--xla-flags', default='', help='appended to XLA_FLAGS of cnnlab rows')
  parser.add_argument('--torch-threads', type=int, default=0, help='0 = torch default')
  parser.add_argument('--device', choices=('auto', 'cpu', 'gpu'), default='auto')
  parser.add_argument('--timeout', type=float, default=1800.0, help='seconds per row')
  parser.add_argument('--json', default=None, help='also write the results here')
  parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    return child_main(args.child)

  models = split_list(args.models, MODELS, 'models')
  dtypes = split_list(args.dtypes, ('float32', 'bfloat16'), 'dtypes', DTYPE_ALIASES)
  peers = split_list(args.peers, PEERS, 'peers')
  steps, warmup = (3, 1) if args.quick else (args.steps, args.warmup)
  if steps < 1 or warmup < 0:
    raise SystemExit('--steps must be >= 1 and --warmup >= 0')
  batches = parse_batch(args.batch, models)
  cpu_devices = [int(v) for v in args.cpu_devices.split(',')]
  device = detect_device() if args.device == 'auto' else args.device
  import importlib.util
  have_torch = importlib.util.find_spec('torch') is not None
  if not have_torch and any(p != 'cnnlab' for p in peers):
    print('torch is not installed: measuring cnnlab only', file=sys.stderr)
    peers = [p for p in peers if p == 'cnnlab']

  meta = {'command': ' '.join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
          'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'host': platform.node(),
          'cpu_count': os.cpu_count(), 'processor': cpu_model(), 'device': device,
          'python': platform.python_version(), 'steps': steps, 'warmup': warmup,
          'load_before': list(os.getloadavg())}
  print(f'device: {device}; host cores: {os.cpu_count()}; load average: '
        f'{" ".join(f"{v:.2f}" for v in os.getloadavg())}; steps {steps} after {warmup} warm-up',
        flush=True)
  rows = []
  for name in models:
    arch = MODELS[name]
    batch = batches.get(name, arch.batch_gpu if device == 'gpu' else arch.batch_cpu)
    for dtype in dtypes:
      plan = [('cnnlab', d) for d in cpu_devices] if 'cnnlab' in peers else []
      plan += [(p, None) for p in peers if p != 'cnnlab']
      reference = None
      for peer, ndev in plan:
        spec = {'peer': peer, 'model': arch.model, 'bench_model': name, 'dtype': dtype,
                'batch': batch, 'steps': steps, 'warmup': warmup, 'device': device,
                'input_shape': list(arch.input_shape), 'num_classes': arch.num_classes,
                'expected_params': arch.params, 'torch_kwargs': list(arch.torch_kwargs),
                'torch_threads': args.torch_threads}
        if peer == 'cnnlab':
          spec.update(experiment=arch.experiment, cpu_devices=ndev, overrides=[
              *cnnlab_overrides(arch, dtype=dtype, batch=batch, steps=warmup + steps + 1,
                                cpu_devices=ndev), *args.override])
        print(f'  {name} {dtype} {peer}{"" if ndev is None else f" cpu_devices={ndev}"} ...',
              end='', flush=True)
        result = run_row(spec, child_env(peer, device, args.xla_flags), args.timeout)
        row = {**{k: v for k, v in spec.items() if k not in ('torch_kwargs',)}, 'model': name,
               'cnnlab_model': arch.model, **result}
        if row['ok']:
          if peer == 'cnnlab' and reference is None:
            reference = row['images_per_s']
          row['ratio_cnnlab_over_peer'] = (reference / row['images_per_s']
                                           if reference is not None else None)
          print(f' {row["images_per_s"]:.1f} images/s ({row["wall_s"]:.0f}s)', flush=True)
        else:
          print(f' FAILED ({row["wall_s"]:.0f}s)\n' + row['error'], flush=True)
        rows.append(row)
  meta['load_after'] = list(os.getloadavg())
  print()
  print_table(rows)
  print(f'\nimages/s: batch / median step; compile s: cnnlab trace+lower+compile, torch_compile '
        f'its first step; peak MiB: {"device peak" if device == "gpu" else "max RSS of the row"}; '
        f'cnnlab/peer: cnnlab images/s over the row\'s. Load average after: '
        f'{" ".join(f"{v:.2f}" for v in os.getloadavg())}')
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump({'meta': meta, 'rows': rows}, f, indent=1)
  return 0 if all(r['ok'] for r in rows) else 1


if __name__ == '__main__':
  sys.exit(main())
