"""Reconstruction: an autoencoder gives its input back. Model output: (B, H, W, C) pixel logits;
their sigmoid is the reconstruction in 0..1. No label is read: the images are the targets."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnlab.layers import as_logits
from cnnlab.tasks import figures
from cnnlab.tasks.base import Task, TaskError, check_shape, output_shape
from cnnlab.tasks.names import HEADLINES, METRICS

PIXEL_LOSSES = ('mse', 'bce')
# PSNR of a perfect reconstruction is infinite; an image's MSE is floored here (PSNR <= 100 dB).
MIN_MSE = 1e-10


@dataclasses.dataclass(frozen=True)
class Reconstruction(Task):
  """Loss: `task.pixel_loss`, 'mse' (of the sigmoid against the clean image scaled to 0..1) or
  'bce' (binary cross-entropy with the logits, for near-binary images like digits). Metrics:
  'mse' over every pixel of the split and 'psnr', the mean over images of 10 log10(1 / MSE) in dB
  (the headline). A denoising autoencoder corrupts its input inside the model (train only), so
  the target here is always the clean image."""
  name = 'reconstruction'
  keys = ()
  headline, mode = HEADLINES[name]
  metrics = METRICS[name]

  pixel_loss: str = 'mse'

  @classmethod
  def model_classes(cls, info):
    return None

  @classmethod
  def from_config(cls, config, num_classes, class_names=None):
    return cls(num_classes=None, class_names=class_names, pixel_loss=config.task.pixel_loss)

  @classmethod
  def check_config(cls, task_config, info):
    if task_config.pixel_loss not in PIXEL_LOSSES:
      return [f'task.pixel_loss={task_config.pixel_loss!r}: expected one of {PIXEL_LOSSES}']
    return []

  def check_outputs(self, outputs, images) -> None:
    if isinstance(outputs, dict):
      raise TaskError(f'reconstruction takes {tuple(images.shape)} pixel logits; the model gives '
                      f'a dict {output_shape(outputs)}')
    check_shape('reconstruction pixel logits', outputs.shape, tuple(images.shape))

  def _errors(self, outputs, batch):
    """(per-pixel loss, per-pixel squared error of the sigmoid), each (B, H, W, C)."""
    logits = as_logits(outputs)
    target = batch['image'].astype(logits.dtype) / 255.0
    squared = jnp.square(jax.nn.sigmoid(logits) - target)
    if self.pixel_loss == 'bce':
      return optax.sigmoid_binary_cross_entropy(logits, target), squared
    return squared, squared

  def loss(self, outputs, batch):
    loss, squared = self._errors(outputs, batch)
    return jnp.mean(loss), {'mse': jnp.mean(squared)}

  def eval_sums(self, outputs, batch, valid):
    loss, squared = self._errors(outputs, batch)
    per_image = jnp.mean(squared, axis=(1, 2, 3))
    psnr = -10.0 * jnp.log10(jnp.maximum(per_image, MIN_MSE))
    return {'loss': jnp.sum(jnp.mean(loss, axis=(1, 2, 3)) * valid),
            'squared_error': jnp.sum(per_image * valid), 'psnr': jnp.sum(psnr * valid),
            'count': jnp.sum(valid)}

  def finalize(self, sums):
    count = float(sums['count'])
    return {'loss': float(sums['loss']) / count, 'mse': float(sums['squared_error']) / count,
            'psnr': float(sums['psnr']) / count}, {}

  def predict(self, outputs):
    """{'reconstruction': (B, H, W, C) pixels in 0..1}."""
    return {'reconstruction': jax.nn.sigmoid(as_logits(outputs))}

  def truth(self, batch):
    return {}

  def figure(self, images, prediction, truth, path, *, title=None):
    reconstruction = np.asarray(prediction['reconstruction'])

    def draw(ax, r, c):  # (example, kind)
      image = images[r] if c == 0 else reconstruction[r]
      ax.imshow(figures.as_rgb(image), cmap='gray')
      if c == 1:
        target = figures.as_rgb(images[r])
        mse = float(np.mean(np.square(figures.as_rgb(image) - target)))
        ax.set_xlabel(f'PSNR {-10 * np.log10(max(mse, MIN_MSE)):.1f} dB', fontsize=8)
    return figures.grid(path, ['image', 'reconstruction'], len(images), draw, title=title)


__all__ = ['Reconstruction', 'PIXEL_LOSSES']
