"""Test setup: several CPU devices so parallel code is exercised on every run, strict dtypes."""

import os

# Must happen before JAX initialises its backends: 8 CPU devices, with the thread pool and
# rendezvous timeouts that make their collectives safe (parallel.patient_cpu_collectives).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from cnnlab import parallel  # noqa: E402  (imports jax, but starts no backend)

parallel.patient_cpu_collectives()
parallel.fast_cpu_flags()  # the convolution library cnnlab's entry points choose

import jax  # noqa: E402

jax.devices()  # start the backend now, with this environment
# Subprocesses the tests start size their own pool from their own device count.
os.environ.pop('PJRT_NPROC', None)
jax.config.update('jax_numpy_dtype_promotion', 'strict')
