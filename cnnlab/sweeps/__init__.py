"""Ablation sweeps: a config file's `get_sweep()` -> one run per point -> a report.

  plan     the sweep helpers an experiment file uses (grid, zipped, product, with_seeds,
           transfer_ways), and the planning of a sweep into checked points with their run
           directories
  runner   runs the points as child processes, N at a time, resumably
  report   results.csv, report.md and plots of a directory of runs

Importing this package does not import JAX. An experiment file defines its sweep with

    from cnnlab import sweeps

    def get_sweep():
      return sweeps.with_seeds(sweeps.grid({'model.kernel_size': [3, 5, 7]}), 3)
"""

from cnnlab.sweeps.plan import grid, product, transfer_ways, with_seeds, zipped

__all__ = ['grid', 'product', 'transfer_ways', 'with_seeds', 'zipped']
