"""cnnlab: a JAX/Flax research framework for convolutional neural networks."""

__version__ = '0.1.0'


def load_run(workdir: str, step=None):
  """(config, model, variables) of the run in `workdir`: see cnnlab.checkpoint.load_run."""
  from cnnlab.checkpoint import load_run as _load_run
  return _load_run(workdir, step)
