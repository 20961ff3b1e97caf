"""Do an autoencoder's embeddings help a classifier that sees few labels? mnist5k digits with 10
and with 100 labelled examples per class, three ways, 3 seeds each (18 runs):

  scratch   the `conv_encoder` classifier trained on those labels only
  probe     the autoencoder's encoder, frozen (weights and batch-norm statistics), under a
            linear classifier trained on the labels (optim.freeze = ('encoder',))
  finetune  the autoencoder's encoder as the initialisation, everything trained

  cnnlab train --config experiments/autoencoder_mnist5k.py --workdir runs/autoencoder_mnist5k
  cnnlab sweep --config experiments/embeddings_mnist5k.py --root runs/embeddings --workers 2
  cnnlab report runs/embeddings

The autoencoder trains on the 4,000 training digits without their labels; the classifiers on the
first 10 or 100 of each class (data.examples_per_class) for the same number of steps; all are
tested on the 1,000 test digits. `AUTOENCODER` is the first command's --workdir, relative to
where the sweep runs. The measured table is in the README ("Autoencoders and embeddings").
"""

from cnnlab import sweeps
from cnnlab.configs import base

AUTOENCODER = 'runs/autoencoder_mnist5k'


def get_config():
  config = base.get_config()
  config.model.name = 'conv_encoder'
  # The autoencoder's encoder (experiments/autoencoder_mnist5k.py): the same parameter paths
  # under 'encoder', so it transfers tensor for tensor.
  config.model.features = (32, 32)
  config.model.downsample = 'stride'
  config.model.head = 'flatten'  # a linear classifier on the 7x7x32 code
  config.data.name = 'mnist5k'
  config.data.normalize = 'none'  # as the autoencoder saw its input
  config.data.examples_per_class = 10
  config.data.augment.translate = 2
  config.train.batch_size = 50
  config.train.num_steps = 400
  config.train.eval_every_steps = 100
  config.train.log_every_steps = 50
  config.optim.name = 'adam'
  config.optim.learning_rate = 1e-3
  config.optim.schedule = 'cosine'
  config.checkpoint.keep = 1
  config.log.progress = 'plain'
  return config


def get_sweep():
  methods = [
      {'transfer.init_from': None, 'optim.freeze': ()},  # scratch
      {'transfer.init_from': AUTOENCODER, 'optim.freeze': ('encoder',)},  # linear probe
      {'transfer.init_from': AUTOENCODER, 'optim.freeze': ()},  # fine-tuned
  ]
  return sweeps.with_seeds(sweeps.product(
      sweeps.grid({'data.examples_per_class': [10, 100]}), methods), 3)
