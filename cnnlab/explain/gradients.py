"""Gradient attributions: saliency, guided backpropagation, the deconvnet, integrated gradients.

Each is `method(model, variables, images, target, **options) -> (B, H, W, C)`, with images as the
model sees them (normalised floats) and target (B,) class indices; each explains the target's
logit. They are pure and jittable with the model and options static:

    jax.jit(functools.partial(explain.guided_backprop, model))(variables, images, target)

Guided backpropagation and the deconvnet differ from the plain gradient only at ReLUs, which
`cnnlab.layers.relu_backward` changes in every block of the zoo (convolution blocks, residual
sums, Inception branches, heads) and in any model built from `cnnlab.layers`. Max pooling routes
the signal back through its switches (each window's maximum), which is its ordinary gradient.
Captum's Saliency, GuidedBackprop, Deconvolution and IntegratedGradients
(method='riemann_trapezoid') give the same numbers (tests/test_explain.py).
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.explain import probe
from cnnlab.layers.common import relu_backward


def _input_gradient(model: nn.Module, variables, images: jax.Array, target: jax.Array,
                    mode: str) -> jax.Array:
  """d logit[target] / d images, with ReLU's backward pass `mode`: (B, H, W, C)."""
  def score(x):
    with relu_backward(mode):
      logits = probe.logits(model, variables, x)
    return jnp.sum(probe.target_scores(logits, target))
  return jax.grad(score)(images)


def _warn_stray(info: probe.Inspection, method: str) -> None:
  if info.stray_relus:
    warnings.warn(
        f'{info.model} calls jax.nn.relu directly {info.stray_relus} time(s); {method} changes '
        'only the ReLUs of cnnlab.layers, so those keep their ordinary gradient. Use '
        "cnnlab.layers.activation('relu') (or cnnlab.layers.common.relu) in the model.",
        stacklevel=3)


def saliency(model: nn.Module, variables, images, target, *, abs: bool = True) -> jax.Array:
  """Simonyan et al. 2013: the gradient of the target logit with respect to the input pixels,
  its absolute value by default (`abs=False`: signed). (B, H, W, C) -> (B, H, W, C)."""
  images, target, _ = probe.check(model, variables, images, target)
  grads = _input_gradient(model, variables, images, target, 'default')
  return jnp.abs(grads) if abs else grads


def guided_backprop(model: nn.Module, variables, images, target) -> jax.Array:
  """Springenberg et al. 2014: the gradient where each ReLU passes back only positive signal,
  and only where its input was positive. (B, H, W, C) -> (B, H, W, C)."""
  images, target, info = probe.check(model, variables, images, target, relu_mode='guided')
  _warn_stray(info, 'guided_backprop')
  return _input_gradient(model, variables, images, target, 'guided')


def deconvnet(model: nn.Module, variables, images, target) -> jax.Array:
  """Zeiler & Fergus 2013: the signal goes down through transposed convolutions, max-pool
  switches and ReLUs applied to the signal itself (the forward ReLU mask is ignored).
  (B, H, W, C) -> (B, H, W, C)."""
  images, target, info = probe.check(model, variables, images, target, relu_mode='deconvnet')
  _warn_stray(info, 'deconvnet')
  return _input_gradient(model, variables, images, target, 'deconvnet')


def riemann_trapezoid(steps: int) -> tuple[np.ndarray, np.ndarray]:
  """(alphas, weights) of `steps` points: alphas evenly from 0 to 1, weights 1/steps halved at
  both ends. These are Captum's 'riemann_trapezoid' numbers, weights summing to (steps-1)/steps
  rather than 1, so that results agree with Captum's; the difference from 1 vanishes with steps."""
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
    raise ValueError(f'steps must be an integer >= 2, got {steps!r}')
  weights = np.full(steps, 1.0 / steps)
  weights[[0, -1]] /= 2
  return np.linspace(0.0, 1.0, steps), weights


def integrated_gradients(model: nn.Module, variables, images, target, *, baseline=0.0,
                         steps: int = 50, batch_size: int | None = None) -> jax.Array:
  """Sundararajan et al. 2017: (images - baseline) times the path integral of the gradient from
  the baseline to the images, by the trapezoid rule over `steps` points (`riemann_trapezoid`).

  baseline: a scalar (0: the training mean, in normalised units), (C,), (H, W, C) or images'
  shape. batch_size: images per model evaluation (memory against speed; default 256).
  (B, H, W, C) -> (B, H, W, C).
  """
  images, target, _ = probe.check(model, variables, images, target)
  alphas, weights = riemann_trapezoid(steps)
  baseline = probe.broadcast_baseline(baseline, images)
  chunk = probe.chunk_size(images.shape[0], batch_size, steps)
  pad = -steps % chunk  # padded points have weight 0
  alphas = jnp.asarray(np.pad(alphas, (0, pad)).reshape(-1, chunk), images.dtype)
  weights = jnp.asarray(np.pad(weights, (0, pad)).reshape(-1, chunk), images.dtype)
  delta = images - baseline
  targets = jnp.tile(target, chunk)

  def accumulate(total, chunk_points):
    a, w = chunk_points  # (chunk,) each
    # The chunk's points of every image as one batch: (chunk * B, H, W, C).
    points = (baseline[None] + a[:, None, None, None, None] * delta[None]).reshape(
        (-1, *images.shape[1:]))
    grads = _input_gradient(model, variables, points, targets, 'default')
    return total + jnp.tensordot(w, grads.reshape((chunk, *images.shape)), axes=1,
                                 precision=jax.lax.Precision.HIGHEST), None

  zeros = jnp.zeros_like(images)
  if alphas.shape[0] == 1:  # one evaluation: no loop (a loop around a gradient compiles slowly)
    return delta * accumulate(zeros, (alphas[0], weights[0]))[0]
  total, _ = jax.lax.scan(accumulate, zeros, (alphas, weights))
  return delta * total


__all__ = ['saliency', 'guided_backprop', 'deconvnet', 'integrated_gradients', 'riemann_trapezoid']
