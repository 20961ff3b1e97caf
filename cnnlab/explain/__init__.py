"""See what a network learned: attributions, feature maps, top activations, receptive fields.

Every attribution method is pure and jittable (model and options static) and is called as

    method(model, variables, images, target, **options)

with `images` (B, H, W, C) as the model sees them (normalised floats, `run.preprocess(...)`) and
`target` (B,) class indices; it returns (B, H, W, C) attributions of the target's logit (Grad-CAM:
(B, h, w) at its layer plus a (B, H, W) upsampled copy). Options: `abs` (saliency), `baseline`
(integrated_gradients, occlusion), `steps` (integrated_gradients), `layer` (grad_cam), `window` and
`stride` (occlusion), and `batch_size` (images per evaluation: integrated_gradients, occlusion).

  gradients     saliency, guided_backprop, deconvnet, integrated_gradients
  cam           grad_cam
  perturbation  occlusion
  features      filters, feature_maps, top_activations, receptive_field_map
  probe         input checks, the named layers (list_layers), taps on a layer's output
  figures       the PNG grids

`cnnlab explain` (cnnlab.explain_cli) draws them for a trained run. The package sits below
cnnlab.train, so a training run can draw them too (log.images).

Guided backpropagation and the deconvnet replace ReLU's backward pass through one mechanism:
`relu_backward('guided' | 'deconvnet')` (cnnlab.layers.common), read when `cnnlab.layers`'s
`relu` is traced; every ReLU in cnnlab.layers is that function. Outside it ReLU is jax.nn.relu.

    >>> run = cnnlab.load_run('runs/quickstart')
    >>> x = run.preprocess(images)                      # uint8 (B, 28, 28, 1)
    >>> cam = explain.grad_cam(run.model, run.variables, x, labels, layer='stage3_conv1')

The submodules are imported when first used, so `cnnlab explain`'s parser loads no JAX.
"""

import importlib

# name -> the submodule that defines it
_EXPORTS = {
    'saliency': 'gradients', 'guided_backprop': 'gradients', 'deconvnet': 'gradients',
    'integrated_gradients': 'gradients', 'grad_cam': 'cam', 'GradCam': 'cam',
    'occlusion': 'perturbation', 'filters': 'features', 'feature_maps': 'features',
    'top_activations': 'features', 'TopActivations': 'features',
    'receptive_field_map': 'features', 'ReceptiveFieldMap': 'features',
    'list_layers': 'probe',
}
_FROM_LAYERS = ('RELU_BACKWARD', 'relu', 'relu_backward')

# The attribution methods by name (`cnnlab explain --method`), in the order the command lists them.
METHOD_NAMES = ('grad_cam', 'saliency', 'guided_backprop', 'deconvnet', 'integrated_gradients',
                'occlusion')


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f'cnnlab.explain.{_EXPORTS[name]}'), name)
  if name in _FROM_LAYERS:
    return getattr(importlib.import_module('cnnlab.layers.common'), name)
  if name == 'METHODS':
    return {method: __getattr__(method) for method in METHOD_NAMES}
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted([*globals(), *_EXPORTS, *_FROM_LAYERS, 'METHODS'])


__all__ = ['METHODS', 'METHOD_NAMES', *_FROM_LAYERS, *sorted(_EXPORTS)]
