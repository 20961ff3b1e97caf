"""The seeds' ablation: kernel size x stride x pooling in a two-stage conv_stack on mnist5k.

  cnnlab sweep --config experiments/ablation_kernel_stride_pool.py --root runs/ablation --workers 2
  cnnlab report runs/ablation

kernel_size {3, 5, 7} x stride {1, 2} x pool {max, avg, none} x 3 seeds = 54 runs. The stride is
that of each stage's convolution; `pool='none'` with stride 2 is the strided convolution replacing
pooling, and with stride 1 the network never downsamples. Each run: two stages of 16 and 32
filters with batch norm, then the flattened map into the classifier (as the classic CNNs do; the
no-downsampling runs thus have 25,088 inputs to it), 3 epochs of 4,000 MNIST digits (SGD,
one-cycle schedule), evaluated on the 1,000 test digits. The stride-1, no-pooling runs cost most
(both stages at 28x28). Measured wall time and results: README ("Ablation sweeps").
"""

from cnnlab.configs import base

from cnnlab import sweeps


def get_config():
  config = base.get_config()
  config.seed = 0
  config.model.name = 'conv_stack'
  config.model.filters = (16, 32)
  config.model.kernel_size = 3
  config.model.stride = 1
  config.model.padding = 'SAME'
  config.model.pool = 'max'
  config.model.norm = 'batch'
  config.model.head = 'flatten'
  config.data.name = 'mnist5k'
  config.train.batch_size = 128
  config.train.num_epochs = 3.0
  config.train.log_every_steps = 8
  config.optim.name = 'sgd'
  config.optim.learning_rate = 0.1
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 5e-4
  config.optim.schedule = 'onecycle'
  config.optim.peak_fraction = 0.25
  config.checkpoint.keep = 1
  config.log.progress = 'plain'
  return config


def get_sweep():
  return sweeps.with_seeds(sweeps.grid({
      'model.kernel_size': [3, 5, 7],
      'model.stride': [1, 2],
      'model.pool': ['max', 'avg', 'none'],
  }), 3)
