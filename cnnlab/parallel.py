"""Data parallelism, in one place: meshes, shardings, jit vs pmap, jax.distributed.

'jit' (default): one `jax.jit` over a 1-D Mesh named 'data'. The batch is sharded on 'data', the
  state replicated (or, with fsdp, each parameter and its optimizer state split over 'data' along
  its largest divisible dimension), donated, and returned with the same shardings. XLA inserts the
  gradient all-reduce; batch norm sees the global batch.
'pmap': state replicated with a leading device axis under `jax.pmap(axis_name='data')`; the step
  averages gradients with `lax.pmean` and the model its batch statistics (bn_axis_name='data').
  Every device receives the global batch, augments it exactly as the jit path would, and keeps its
  own slice, so both strategies compute the same thing.

Multi-host runs use JAX's own runtime: `initialize_distributed()` calls `jax.distributed.initialize`
(which reads SLURM / TPU-pod environments itself, or explicit coordinator arguments).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cnnlab import platforms

AXIS = 'data'


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-process run. With no arguments, only when the environment describes one
  (SLURM with several tasks, a TPU pod, or JAX_COORDINATOR_ADDRESS); a no-op otherwise."""
  if jax.distributed.is_initialized():
    return
  if coordinator is None and num_processes is None:
    in_slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1
    if not (in_slurm or 'JAX_COORDINATOR_ADDRESS' in os.environ or 'TPU_WORKER_HOSTNAMES' in os.environ):
      return
  # Cross-process collectives of the CPU backend (harmless for GPU/TPU, which bring their own).
  # Asking for the backend here would initialise it, which initialize() must precede.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


# XLA's CPU collectives abort the process when a device thread misses a rendezvous for ~40 s,
# which an overloaded host (a shared CI machine, a sweep with several workers) causes with nothing
# wrong. Wait 5 minutes: long enough for a starved thread, short enough that a real deadlock fails
# fast instead of hanging a job.
CPU_COLLECTIVE_FLAGS = ('--xla_cpu_collective_call_terminate_timeout_seconds=300',
                        '--xla_cpu_collective_timeout_seconds=300',
                        '--xla_cpu_collective_call_warn_stuck_timeout_seconds=120')


def cpu_pool_threads(num_devices: int) -> int:
  """Threads the XLA:CPU intra-op pool needs so that N devices in one process cannot deadlock.

  XLA runs a device's collective (all-reduce) on whichever pool thread finished the work before
  it, and that thread then blocks until every device has arrived. With the default pool of one
  thread per core, 2 devices on 2 cores (or 8 on 2) deadlock within seconds: the blocked threads
  are the ones the missing device needs to reach the rendezvous. `bench/stress_collectives.py`
  reproduces it: a pool of N, N + 1 or 1.5 N threads still deadlocks; 2 N threads never did.
  """
  return max(os.cpu_count() or 1, 2 * num_devices)


def _flag_device_count(flags: str) -> int | None:
  match = re.search(r'--xla_force_host_platform_device_count=(\d+)', flags)
  return int(match.group(1)) if match else None


def patient_cpu_collectives(num_devices: int | None = None, environ=os.environ) -> None:
  """Makes several CPU devices in one process safe to use; call before JAX starts its backend.

  num_devices: the CPU device count (None: read XLA_FLAGS' --xla_force_host_platform_device_count).
  Sizes XLA's CPU thread pool to at least `cpu_pool_threads` through PJRT_NPROC (a larger value
  already there is kept) and adds CPU_COLLECTIVE_FLAGS to XLA_FLAGS (unless set there already).
  The pool costs throughput beyond the core count (ResNet-18 on 2 devices: -12% with 4 threads
  instead of 2; bench/README.md), which is the price of not deadlocking.
  """
  flags = environ.get('XLA_FLAGS', '')
  if num_devices is None:
    num_devices = _flag_device_count(flags) or 1
  if num_devices > 1:
    threads = cpu_pool_threads(num_devices)
    current = environ.get('PJRT_NPROC', '')
    if not current.isdigit() or int(current) < threads:
      environ['PJRT_NPROC'] = str(threads)
  _add_xla_flags(CPU_COLLECTIVE_FLAGS, environ)


def _add_xla_flags(new: tuple[str, ...], environ) -> None:
  """Appends each of `new` to XLA_FLAGS unless XLA_FLAGS already sets that flag."""
  flags = environ.get('XLA_FLAGS', '')
  extra = [f for f in new if f.split('=')[0] not in flags]
  environ['XLA_FLAGS'] = ' '.join([flags, *extra]).strip()


# jaxlib 0.10's XLA:CPU hands convolutions to YNNPACK by default. On the 2-core AVX-512 machine
# XLA's own (Eigen) convolutions are faster in every network measured: the quickstart's train step
# takes 49 ms instead of 84, ResNet-18-CIFAR's runs at 33.7 images/s instead of 25.3
# (bench/README.md). An empty fusion-type list turns YNNPACK's fusions off.
CPU_SPEED_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=',)


def fast_cpu_flags(environ=os.environ) -> None:
  """Adds CPU_SPEED_FLAGS to XLA_FLAGS, each unless XLA_FLAGS sets that flag already (so a user's
  choice wins); call before JAX starts its backend. GPU and TPU backends ignore them."""
  _add_xla_flags(CPU_SPEED_FLAGS, environ)


def configure_cpu_devices(count: int = 0) -> bool:
  """Splits the CPU backend into `count` devices (0: one per core) if JAX has not started yet.

  Returns whether it took effect. On a GPU/TPU host this only shapes the (unused) CPU backend.
  """
  count = count or os.cpu_count() or 1
  patient_cpu_collectives(count)
  fast_cpu_flags()
  try:
    jax.config.update('jax_num_cpu_devices', count)
  except RuntimeError:  # backends already initialised (e.g. under tests): keep what exists
    return False
  return True


@dataclasses.dataclass
class Parallel:
  """The device layout of a run and how its step is compiled."""
  strategy: str
  mesh: Mesh
  fsdp: bool = False

  @classmethod
  def create(cls, strategy: str = 'jit', num_devices: int = 0, fsdp: bool = False) -> 'Parallel':
    devices = jax.devices()
    if num_devices:
      if num_devices > len(devices):
        raise ValueError(f'parallel.num_devices={num_devices} but only {len(devices)} devices exist')
      devices = devices[:num_devices]
    return cls(strategy, Mesh(np.asarray(devices), (AXIS,)), fsdp)

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  @property
  def platform(self) -> str:
    """The devices' platform ('cpu', 'gpu', 'tpu'), which the steps are traced for."""
    return self.mesh.devices.flat[0].platform

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(AXIS))

  @property
  def axis_name(self) -> str | None:
    """The collective axis the step and batch norm name: only pmap needs one."""
    return AXIS if self.strategy == 'pmap' else None

  # ---- state ----

  def state_shardings(self, state) -> Any:
    """Per-leaf shardings: replicated, or FSDP (largest dim divisible by the device count)."""
    def rule(x):
      if not self.fsdp or np.ndim(x) == 0:
        return self.replicated
      dims = [d for d in np.argsort(np.shape(x))[::-1] if np.shape(x)[d] % self.num_devices == 0]
      if not dims or np.size(x) < 2 ** 14:  # small leaves are not worth splitting
        return self.replicated
      spec = [None] * np.ndim(x)
      spec[dims[0]] = AXIS
      return NamedSharding(self.mesh, P(*spec))
    return jax.tree.map(rule, state)

  def stack_replicas(self, tree):
    """pmap's layout: every leaf gets a leading axis of one copy per device, split over them."""
    n, sharding = self.num_devices, NamedSharding(self.mesh, P(AXIS))
    return jax.tree.map(lambda x: jax.device_put(jnp.broadcast_to(x, (n, *np.shape(x))), sharding), tree)

  def place_state(self, state):
    """Host/one-device state -> the layout the compiled step expects."""
    if self.strategy == 'pmap':
      return self.stack_replicas(state)
    return jax.device_put(state, self.state_shardings(state))

  def unreplicate(self, tree):
    """The state as one logical copy (for checkpoints and evaluation helpers)."""
    if self.strategy == 'pmap':
      return jax.tree.map(lambda x: x[0], tree)
    return tree

  def place_replicated(self, tree):
    """Arrays every device needs whole (the device pipeline's split, eval data)."""
    return self.stack_replicas(tree) if self.strategy == 'pmap' else tree

  # ---- steps ----

  def compile_train(self, preprocess: Callable, update: Callable, batch_fn: Callable | None,
                    state, data) -> Callable:
    """`run(state, data) -> (state, metrics)`, compiled now for these arguments' shapes (so the
    caller can time compilation apart from training, under either strategy).

    The step is update(state, *preprocess(state, batch)): preprocess(state, batch) -> (images,
    batch) augments and normalises a global batch, update(state, images, batch) -> (state,
    metrics) takes the gradient step. `data` is the device pipeline's arrays, from which
    `batch_fn(arrays, step)` draws the batch inside the step, or, with batch_fn None, a global
    batch. Under pmap every device preprocesses the global batch, exactly as under jit, and
    updates on its own slice.
    """
    draw = lambda state, data: data if batch_fn is None else batch_fn(data, state.step)  # noqa: E731
    if self.strategy == 'pmap':
      return self._pmap_train(preprocess, update, draw, batch_fn is None, state, data)

    @functools.partial(platforms.traced_for, self.platform)
    def run(state, data):
      return update(state, *preprocess(state, draw(state, data)))
    data_sharding = jax.tree.map(lambda _: self.replicated if batch_fn else self.batch_sharding, data)
    state_sharding = self.state_shardings(state)
    return jax.jit(run, in_shardings=(state_sharding, data_sharding),
                   out_shardings=(state_sharding, self.replicated),
                   donate_argnums=0).lower(state, data).compile()

  def _pmap_train(self, preprocess, update, draw, stack_data: bool, state, data) -> Callable:
    n = self.num_devices

    @functools.partial(platforms.traced_for, self.platform)
    def run(state, data):
      images, batch = preprocess(state, draw(state, data))
      index = lax.axis_index(AXIS)
      local = lambda x: lax.dynamic_slice_in_dim(x, index * (x.shape[0] // n), x.shape[0] // n)
      return update(state, local(images), jax.tree.map(local, batch))

    stack = self.stack_replicas if stack_data else (lambda tree: tree)
    compiled = jax.pmap(run, axis_name=AXIS, donate_argnums=0).lower(state, stack(data)).compile()
    # One replica's metrics (every replica holds the same, averaged ones), compiled now too: the
    # first training call compiles nothing.
    first = jax.jit(lambda tree: jax.tree.map(lambda x: x[0], tree)).lower(
        compiled.out_info[1]).compile()

    def call(state, data):
      new_state, metrics = compiled(state, stack(data))
      return new_state, first(metrics)
    return call

  def compile_eval(self, eval_step: Callable, state) -> Callable:
    """`run(state, batch) -> eval_step's output` (sums and records, cnnlab.train.step) over a
    global evaluation batch, every leaf whole on every device: under jit the output is
    replicated (XLA gathers the records' rows from the devices, and hosts, that computed them);
    under pmap the step psums and all-gathers over the devices itself, and one device's copy is
    returned. So the host reads the same global arrays under either strategy (`fetch_rows`)."""
    eval_step = platforms.traced_for(self.platform, eval_step)
    if self.strategy == 'pmap':
      n = self.num_devices
      def run(state, batch):
        index = lax.axis_index(AXIS)
        local = lambda x: lax.dynamic_slice_in_dim(x, index * (x.shape[0] // n), x.shape[0] // n)
        return eval_step(state, jax.tree.map(local, batch))
      stepped = jax.pmap(run, axis_name=AXIS)
      def call(state, batch):
        batch = self.stack_replicas(batch)
        return jax.tree.map(lambda x: x[0], stepped(state, batch))
      return call
    return jax.jit(eval_step, in_shardings=(self.state_shardings(state), self.batch_sharding),
                   out_shardings=self.replicated)


def fetch(tree) -> Any:
  """Device scalars -> Python floats (one host sync for the whole tree)."""
  return jax.tree.map(lambda x: np.asarray(x).item() if np.ndim(x) == 0 else np.asarray(x),
                      jax.device_get(tree))


def to_numpy(tree) -> Any:
  """A tree of global arrays as numpy arrays, whole, on every process: a leaf split over several
  processes is gathered (then every process must call this: it is a collective); replicated or
  single-process leaves are copied from a local device."""
  spans = any(isinstance(x, jax.Array) and not x.is_fully_addressable
              and not x.is_fully_replicated for x in jax.tree.leaves(tree))
  if spans:
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
  return jax.tree.map(np.asarray, jax.device_get(tree))


def fetch_rows(records) -> Any:
  """An evaluation step's records, (tree of (B, ...) arrays, valid (B,) bool) of a global batch,
  -> the tree's rows where valid, as numpy arrays (`to_numpy`: a collective when a leaf spans
  processes). None stays None."""
  if records is None:
    return None
  tree, valid = to_numpy(records)
  keep = np.asarray(valid, bool).reshape(-1)
  return jax.tree.map(lambda x: x[keep], tree)


__all__ = ['AXIS', 'Parallel', 'initialize_distributed', 'fetch', 'to_numpy', 'fetch_rows']
