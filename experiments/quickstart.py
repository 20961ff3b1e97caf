"""Quickstart: a small batch-norm CNN on mnist5k (4,000 real MNIST digits to train, 1,000 to test).

  cnnlab train --config experiments/quickstart.py --workdir runs/quickstart

Target: >= 99.0% test accuracy within 60 s wall time on a 2-core CPU, compilation included,
deterministic for a seed. Measured figures are in the README.
"""

import base


def get_config():
  config = base.get_config()
  config.seed = 0
  config.model.name = 'conv_stack'
  config.model.filters = (32, 64, 128)
  config.model.kernel_size = 3
  config.model.stride = 1
  config.model.padding = 'SAME'
  config.model.pool = 'max'
  config.model.norm = 'batch'
  config.model.head = 'global_avg'
  config.data.name = 'mnist5k'
  config.data.augment.translate = 2
  config.train.batch_size = 128
  config.train.num_epochs = 15.0
  config.train.log_every_steps = 31
  config.optim.name = 'sgd'
  config.optim.learning_rate = 0.1
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 5e-4
  config.optim.schedule = 'onecycle'
  config.optim.peak_fraction = 0.25
  config.checkpoint.keep = 1
  return config
