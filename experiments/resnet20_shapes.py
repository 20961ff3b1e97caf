"""CIFAR-style ResNet-20 (0.27M parameters) classifying procedural shapes (64x64, 4 classes).

  cnnlab train --config experiments/resnet20_shapes.py --workdir runs/resnet20_shapes

Shapes vary in position, scale, rotation, colour and background texture, so the network must
learn shape, not colour or location.
"""

from cnnlab.configs import base


def get_config():
  config = base.get_config()
  config.model.name = 'resnet20'
  config.data.name = 'shapes'
  config.data.shapes.resolution = 64
  config.data.shapes.num_classes = 4
  config.data.augment.flip = 'random'
  config.data.augment.crop_padding = 4
  config.train.batch_size = 128
  config.train.num_epochs = 10.0
  config.optim.name = 'sgd'
  config.optim.learning_rate = 0.1
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 5e-4
  config.optim.schedule = 'cosine'
  config.optim.warmup_epochs = 1.0
  return config
