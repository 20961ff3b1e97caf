"""Grad-CAM (Selvaraju et al. 2017): where, at one layer, the evidence for the target class lies."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab.explain import probe


class GradCam(NamedTuple):
  """cam: (B, h, w) at the layer's resolution; upsampled: (B, H, W), bilinearly resized to the
  image (half-pixel centres, as PyTorch's interpolate with align_corners=False), for overlays."""
  cam: jax.Array
  upsampled: jax.Array


def grad_cam(model: nn.Module, variables, images, target, *, layer: str) -> GradCam:
  """ReLU of the layer's channels summed with weights = the target logit's gradient averaged
  over the layer's positions (Captum's LayerGradCam with relu_attributions=True).

  layer: a module path (`stage3_conv1`, `stage4_block2`) or a sown value that is a module's
  output (`stage3`), whose output is (B, h, w, C); an unknown name lists the layers.
  (B, H, W, C) -> GradCam((B, h, w), (B, H, W)).
  """
  images, target, info = probe.check(model, variables, images, target)
  tapped = info.layer(layer, spatial=True, tap=True)
  module_output = info.layers[tapped.module]

  def score(delta):
    logits, activation = probe.apply_tapped(model, variables, images, tapped.module, delta)
    return jnp.sum(probe.target_scores(logits, target)), activation

  grads, activation = jax.grad(score, has_aux=True)(
      jnp.zeros(module_output.shape, module_output.dtype))
  weights = jnp.mean(grads, axis=(1, 2), keepdims=True)  # (B, 1, 1, C): one weight per channel
  cam = jax.nn.relu(jnp.sum(weights * activation, axis=-1))  # (B, h, w)
  return GradCam(cam, upsample(cam, images.shape[1:3]))


def default_layer(info: probe.Inspection) -> str:
  """Grad-CAM's default layer: the last top-level module with a (B, h, w, C) output, the
  coarsest map that still says where (Selvaraju et al. use the last convolutional layer)."""
  spatial = [name for name, layer in info.layers.items()
             if layer.spatial and layer.module == name and '/' not in name]
  if not spatial:
    raise ValueError(f'{info.model} has no spatial layer for grad_cam')
  return spatial[-1]


def upsample(maps: jax.Array, size) -> jax.Array:
  """(B, h, w) -> (B, H, W) bilinear (half-pixel centres; no antialiasing when shrinking)."""
  return jax.image.resize(maps, (maps.shape[0], *size), 'bilinear', antialias=False)


__all__ = ['GradCam', 'grad_cam', 'default_layer', 'upsample']
