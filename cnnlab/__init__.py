"""cnnlab: a JAX/Flax research framework for convolutional neural networks."""

__version__ = '0.1.0'


def load_run(workdir: str, step=None):
  """The trained model of the run in `workdir`: see cnnlab.inference.load_run."""
  from cnnlab.inference import load_run as _load_run
  return _load_run(workdir, step)
