"""Semantic segmentation of procedural shapes with a U-Net: a class per pixel (4 shape kinds and
the background), trained on per-pixel cross-entropy, scored by mIoU over the test split.

  cnnlab train --config experiments/segment_shapes.py --workdir runs/segment_shapes
  cnnlab predict --run runs/segment_shapes --dataset shapes --split test --out runs/segment_shapes/predict

Target: test mIoU >= 0.90 (background counted as a class) within 10 minutes on a 2-core CPU;
bench/README.md, "Tasks beyond labels", has the figures as measured.
"""

from cnnlab.configs import base


def get_config():
  config = base.get_config()
  config.task.name = 'segmentation'
  config.model.name = 'unet'
  config.model.features = (16, 32, 64)
  config.model.upsample = 'transpose'  # or 'bilinear' (resize, then a 3x3 convolution)
  config.data.name = 'shapes'
  config.data.shapes.resolution = 32
  config.data.shapes.num_classes = 4
  config.data.augment.flip = 'random'  # masks are flipped with their images
  config.train.batch_size = 64
  config.train.num_epochs = 8.0
  config.train.log_every_steps = 100
  config.optim.name = 'adam'
  config.optim.learning_rate = 3e-3
  config.optim.schedule = 'cosine'
  config.optim.warmup_epochs = 0.5
  config.checkpoint.keep = 1
  return config
