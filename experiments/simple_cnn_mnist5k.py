"""The seeds' classic CNN (conv 5x5 x5, pool, conv 5x5 x10, pool, dense 32) on mnist5k.

  cnnlab train --config experiments/simple_cnn_mnist5k.py --workdir runs/simple_cnn

10,002 parameters on 32x32x3 (6,872 on mnist5k's 28x28x1). A baseline for the ablations: no batch norm,
no augmentation, Adam.
"""

from cnnlab.configs import base


def get_config():
  config = base.get_config()
  config.model.name = 'simple_cnn'
  config.data.name = 'mnist5k'
  config.train.batch_size = 64
  config.train.num_epochs = 20.0
  config.optim.name = 'adam'
  config.optim.learning_rate = 3e-3
  config.optim.schedule = 'cosine'
  return config
