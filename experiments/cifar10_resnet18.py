"""ResNet-18 with the CIFAR stem on CIFAR-10: SGD Nesterov, one-cycle, flip + crop.

  cnnlab prepare cifar10          # once; needs the network and `pip install -e '.[prepare]'`
  cnnlab train --config experiments/cifar10_resnet18.py --workdir runs/cifar10_resnet18

Benchmark without the dataset (random images of the same shape, generated on the device):
  cnnlab train --config experiments/cifar10_resnet18.py --workdir runs/r18_synth \
      --config.data.name=synthetic --config.train.num_steps=50
"""

from cnnlab.configs import base


def get_config():
  config = base.get_config()
  config.model.name = 'resnet18'
  config.model.stem = 'cifar'
  config.data.name = 'cifar10'
  config.data.synthetic.image_shape = (32, 32, 3)
  config.data.synthetic.num_classes = 10
  config.data.synthetic.num_examples = 1024
  config.data.augment.flip = 'random'
  config.data.augment.crop_padding = 4
  config.data.augment.crop_mode = 'reflect'
  config.train.batch_size = 128
  config.train.num_epochs = 30.0
  config.train.label_smoothing = 0.1
  config.optim.name = 'sgd'
  config.optim.learning_rate = 0.2
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 5e-4
  config.optim.schedule = 'onecycle'
  config.optim.peak_fraction = 0.25
  return config
