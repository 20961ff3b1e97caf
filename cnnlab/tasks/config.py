"""The `task` section of an experiment config: which task reads the model's output, and its options.

`cnnlab/configs/base.py` calls `default_config()` for `config.task`. Each option says which task
reads it; the others ignore it.
"""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # What the model is trained to do (cnnlab.tasks.TASK_NAMES):
  # 'classification' (a label per image), 'segmentation' (a class per pixel, 0 = background),
  # 'localization' (a label and one box per image), 'reconstruction' (the image itself: an
  # autoencoder), 'detection' (boxes and classes of several objects per image; the detector's
  # settings are its model's). The dataset must have the task's keys (mask; label and bbox;
  # labels, boxes and num_objects: shapes with data.shapes.max_objects >= 1).
  c.name = 'classification'
  # segmentation: loss weight per mask class (background first); () = all 1. PyTorch's
  # CrossEntropyLoss(weight=...): the loss is the weighted mean over pixels.
  c.class_weights = ()
  # segmentation: mask value excluded from the loss and the metrics (e.g. 255 for "void"
  # borders); -1 = none.
  c.ignore_value = 255
  # localization: 'smooth_l1' (on the box corners, in image fractions) or 'giou' (1 - GIoU).
  c.box_loss = 'smooth_l1'
  c.box_weight = 1.0  # localization: the box loss's weight against the cross-entropy (lambda)
  # localization: smooth L1's quadratic zone, in image fractions (torchvision's detection heads
  # use 1/9 on their box deltas).
  c.smooth_l1_beta = 1.0 / 9.0
  c.iou_threshold = 0.5  # localization: the IoU from which a box counts as found ('localized')
  c.pixel_loss = 'mse'  # reconstruction: 'mse' or 'bce' (on pixels scaled to 0..1)
  return c


__all__ = ['default_config']
