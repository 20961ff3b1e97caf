"""Training: a config and a run directory in, a trained run out.

  launch(config_file, workdir, overrides)   what `cnnlab train` and each sweep point run
  loop       train_and_evaluate(config, workdir): the whole run; setup(config): what it builds
  step       the pure train and evaluation steps
  state      TrainState: every mutable thing of a run in one pytree
  optim      the optimizer and learning-rate schedule from config.optim
  checkpoint Orbax checkpoints: commit, retention, restore onto any layout
  resume     exact continuation: config checks, the loop's record, provenance, SIGTERM
  logging    metrics.jsonl, TensorBoard, the progress display
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

from cnnlab.workdir import headline  # no JAX: `cnnlab train --help` stays quick

# The first words of the one line a refused launch prints (the sweep runner reads it back).
ERROR_PREFIX = 'cnnlab train: error: '


def launch(config_file: str, workdir: str, overrides: Sequence[str] = (), *,
           coordinator: str | None = None, num_processes: int | None = None,
           process_id: int | None = None) -> dict[str, Any]:
  """Loads the experiment file with `key=value` overrides, sets up the devices (before JAX starts
  its backends: the CPU split of `parallel.cpu_devices`, unless XLA_FLAGS already splits it) and
  the processes of a multi-host run, then trains into `workdir`; returns summary.json's dict.

  Bad input (config, data, run directory) raises ValueError with a one-line message.
  """
  from cnnlab import config as config_lib, parallel
  if os.getcwd() not in sys.path:  # a user's model module in the current directory
    sys.path.append(os.getcwd())
  config = config_lib.load(config_file, overrides)
  if 'device_count' not in os.environ.get('XLA_FLAGS', ''):
    parallel.configure_cpu_devices(config.parallel.cpu_devices)
  else:  # the caller split the CPU itself (tests, launchers)
    parallel.patient_cpu_collectives()
    parallel.fast_cpu_flags()
  parallel.initialize_distributed(coordinator, num_processes, process_id)
  from cnnlab.train.loop import train_and_evaluate
  return train_and_evaluate(config, workdir, config_file=config_file)


def done_line(summary: dict[str, Any], workdir: str) -> str:
  """The one line that ends a run: steps, the final and best evaluation, times."""
  final, best = summary.get('final_eval') or {}, summary.get('best_eval') or {}
  metric, value = headline(final, (summary.get('headline') or {}).get('metric'))
  metric, value = metric or 'loss', float('nan') if value is None else value
  best_part = (f' (best {best[metric]:.4f} at step {best["step"]})'
               if metric in best and best[metric] != final.get(metric) else '')
  # (an evaluation without a loss, a detector's, says nothing of it)
  loss = '' if final and 'loss' not in final else f", loss {final.get('loss', float('nan')):.4f}"
  return (f"done: {summary['steps']} steps, test {metric} {value:.4f}"
          f"{best_part}{loss}, wall "
          f"{summary['wall_time_s']:.1f}s (compile {summary['compile_time_s']:.1f}s) -> "
          f"{os.path.join(workdir, 'summary.json')}")


__all__ = ['launch', 'done_line', 'ERROR_PREFIX']
