"""Classification + localisation of procedural shapes: one network gives the shape's class and
its bounding box, trained on cross-entropy + lambda x a box loss (Localizer: two heads on a
conv_stack backbone's pooled features).

  cnnlab train --config experiments/localize_shapes.py --workdir runs/localize_shapes
  cnnlab predict --run runs/localize_shapes --dataset shapes --split test --out runs/localize_shapes/predict

Target: test accuracy >= 0.97 and mean box IoU >= 0.80 within 10 minutes on a 2-core CPU;
bench/README.md, "Tasks beyond labels", has the figures as measured.
"""

import ml_collections

from cnnlab.configs import base


def get_config():
  config = base.get_config()
  config.task.name = 'localization'
  config.task.box_loss = 'giou'  # or 'smooth_l1' (on the corners, in image fractions)
  config.task.box_weight = 1.0
  config.model.name = 'localizer'
  config.model.backbone = 'conv_stack'
  # The backbone keeps its spatial layout to the end: a global average would blur where the
  # shape is, so its last stage is flattened.
  config.model.backbone_args = ml_collections.ConfigDict(dict(
      filters=(32, 64, 128), convs_per_stage=2, kernel_size=3, stride=(2, 1, 1),
      pool=('none', 'max', 'max'),
      norm='batch', head='flatten'))
  config.model.box_hidden = 128
  config.data.name = 'shapes'
  config.data.shapes.resolution = 32
  config.data.shapes.num_classes = 4
  config.data.augment.flip = 'random'  # boxes are flipped with their images
  config.train.batch_size = 64
  config.train.num_epochs = 10.0
  config.train.log_every_steps = 100
  config.optim.name = 'adam'
  config.optim.learning_rate = 2e-3
  config.optim.schedule = 'cosine'
  config.optim.warmup_epochs = 0.5
  config.checkpoint.keep = 1
  return config
