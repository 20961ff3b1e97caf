"""log.images: what a training run draws into TensorBoard at each evaluation, so a researcher
watches its first filters and its attention form instead of reading them off a finished run.

  images/filters   the first convolution's filters (explain.figures.filters_mosaic), one tile each
  images/grad_cam  Grad-CAM (explain.cam) of each image's true class at the model's last spatial
                   layer, on the first NUM_IMAGES examples of the evaluation split, beside the
                   image, framed green where the prediction is right and red where it is wrong
                   (explain.figures.attribution_mosaic). The images are the same at every
                   evaluation, so what changes from one panel to the next is the network.

Grad-CAM explains class logits: a model whose output is something else (a segmentation's dense
logits, a reconstruction), or that has no spatial layer, gets its filters drawn only, and the run
says why once. Everything that can be decided once is decided at set-up (which layers, which
images, their normalisation, one jitted Grad-CAM), so an evaluation pays only for fetching the
variables, one forward and backward pass on NUM_IMAGES images and composing two arrays (no
matplotlib figure: drawing one took about as long as the quickstart's whole evaluation).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.data import augment, examples
from cnnlab.explain import cam as cam_lib, features, figures, probe

NUM_IMAGES = 8  # evaluation images in the Grad-CAM panel (fewer when the split has fewer)
FILTERS_TAG = 'images/filters'
GRAD_CAM_TAG = 'images/grad_cam'


def first_convolution(model: nn.Module, variables, input_shape) -> str | None:
  """The module path of the first convolution the forward pass calls (the first module called
  that holds a 4-D kernel), None when there is none. The order of the parameters cannot say it:
  a pytree's dict keys come back sorted, and 'stage1_conv1' sorts before 'stem'."""
  every = features.kernels(variables.get('params', variables))
  called: list[str] = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and context.module.scope is not None:
      called.append('/'.join(context.module.path))
    return next_fun(*args, **kwargs)

  def forward(variables, x):
    with nn.intercept_methods(interceptor):
      return model.apply(variables, x, train=False)

  jax.eval_shape(forward, variables, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  return next((path for path in called if path in every), None)


def to_host(tree, primary: bool):
  """The variables as numpy arrays on the host: where a leaf is split over several processes
  (FSDP on several hosts) every process must call this (it gathers); else only `primary` fetches
  and the others get None. Replicated or single-process arrays need no collective."""
  spans = any(isinstance(x, jax.Array) and not x.is_fully_addressable
              and not x.is_fully_replicated for x in jax.tree.leaves(tree))
  if spans:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree) if primary else None


@dataclasses.dataclass
class TrainImages:
  """Built once by `create`; `render(variables)` after each evaluation gives
  {tag: uint8 (H, W, 3)} for `MetricWriter.write_images` ({} on processes other than 0)."""
  primary: bool
  filters_layer: str | None  # the first convolution's module path
  cam_layer: str | None  # Grad-CAM's layer; None: no Grad-CAM (`skipped` says why)
  skipped: str | None
  images: np.ndarray | None = None  # uint8 (N, H, W, C) as stored
  inputs: jax.Array | None = None  # (N, H, W, C) normalised as the evaluation normalises them
  labels: np.ndarray | None = None  # (N,) the true classes; None: the dataset has none
  explain: Callable[..., Any] | None = None  # jitted `_explainer`

  @classmethod
  def create(cls, run, variables) -> 'TrainImages':
    """Picks the layers and the images for `run` (loop.Run) with its `variables` (only their
    shapes are read), and says on stderr what will be drawn. Processes other than 0 keep nothing."""
    primary = jax.process_index() == 0
    if not primary:
      return cls(False, None, None, None)
    config, model, settings = run.config, run.model, run.settings
    shape = tuple(run.info.image_shape)
    filters_layer = first_convolution(model, variables, shape)
    cam_layer = skipped = None
    try:  # abstract: whether the output is class logits, and the model's spatial layers
      _, _, info = probe.check(model, variables, jnp.zeros((1, *shape), settings.compute_dtype))
      cam_layer = cam_lib.default_layer(info)
    except ValueError as e:
      skipped = str(e)
    out = cls(primary, filters_layer, cam_layer, skipped)
    if cam_layer is not None:
      first = examples.first(config.data, shape, config.data.name, config.data.eval_split,
                             NUM_IMAGES)
      out.images = first['image']
      out.inputs = augment.normalize(jnp.asarray(out.images), settings.mean, settings.std,
                                     settings.compute_dtype)
      labels = first.get('label')
      if labels is not None and labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer) \
          and np.all((labels >= 0) & (labels < info.num_classes)):
        out.labels = labels.astype(np.int32)
      out.explain = jax.jit(_explainer(model, cam_layer))
    print(f'cnnlab: log.images: {out.describe()}', file=sys.stderr, flush=True)
    return out

  def describe(self) -> str:
    """One line: what each evaluation draws, and why Grad-CAM is not drawn when it is not."""
    filters = (f'the filters of {self.filters_layer!r}' if self.filters_layer
               else 'no filters (the model has no convolution)')
    if self.cam_layer is None:
      return f'{filters} only; no Grad-CAM: {self.skipped}'
    target = 'true' if self.labels is not None else 'predicted'
    return (f'{filters} and Grad-CAM at {self.cam_layer!r} of the {target} class on the first '
            f'{len(self.images)} evaluation images, at each evaluation')

  def render(self, variables) -> dict[str, np.ndarray]:
    """{tag: uint8 (H, W, 3)} for `variables` (those the evaluation uses: EMA when the run keeps
    it), in any layout the run's parallelism gave them. Called by every process."""
    host = to_host(variables, self.primary)
    if not self.primary:
      return {}
    out = {}
    if self.filters_layer is not None:
      kernel = np.asarray(features.kernels(host['params'])[self.filters_layer], np.float32)
      out[FILTERS_TAG] = figures.filters_mosaic(kernel)
    if self.explain is not None:
      target = self.labels if self.labels is not None else np.full(len(self.images), -1, np.int32)
      cam, predicted = jax.device_get(self.explain(host, self.inputs, target))
      out[GRAD_CAM_TAG] = figures.attribution_mosaic(
          self.images, cam, signed=False,
          correct=None if self.labels is None else predicted == self.labels)
    return out


def _explainer(model: nn.Module, layer: str):
  """(variables, inputs (N, H, W, C), target (N,)) -> (Grad-CAM (N, H, W), predicted class (N,)),
  one computation; a target of -1 explains that image's predicted class."""
  def explain(variables, inputs, target):
    predicted = jnp.argmax(probe.logits(model, variables, inputs), -1).astype(jnp.int32)
    result = cam_lib.grad_cam(model, variables, inputs, jnp.where(target < 0, predicted, target),
                              layer=layer)
    return result.upsampled.astype(jnp.float32), predicted
  return explain


__all__ = ['NUM_IMAGES', 'FILTERS_TAG', 'GRAD_CAM_TAG', 'TrainImages', 'first_convolution',
           'to_host']
