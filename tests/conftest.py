"""Test setup: several CPU devices so parallel code is exercised on every run, strict dtypes."""

import os

# Must happen before JAX initialises its backends. The suite shares 2 cores between xdist
# workers: CPU collectives must wait for starved device threads instead of aborting, and dispatch
# is synchronous to avoid the cross-program rendezvous deadlocks seen under load (see
# parallel.patient_cpu_collectives).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from cnnlab import parallel  # noqa: E402  (imports jax, but starts no backend)

parallel.patient_cpu_collectives()

import jax  # noqa: E402

jax.config.update('jax_numpy_dtype_promotion', 'strict')
