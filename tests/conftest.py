"""Test setup: several CPU devices so parallel code is exercised on every run, strict dtypes."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_numpy_dtype_promotion', 'strict')
