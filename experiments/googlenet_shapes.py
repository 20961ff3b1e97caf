"""GoogLeNet (Inception v1) with its two auxiliary classifiers on procedural shapes (96x96).

  cnnlab train --config experiments/googlenet_shapes.py --workdir runs/googlenet_shapes

The auxiliary heads (after 4a and 4d) add 0.3 x their cross-entropy to the loss while training,
as in Szegedy et al. 2014; evaluation uses the main head only.
"""

from cnnlab.configs import base


def get_config():
  config = base.get_config()
  config.model.name = 'googlenet'
  config.model.aux_logits = True
  config.train.aux_loss_weight = 0.3
  config.data.name = 'shapes'
  config.data.shapes.resolution = 96
  config.data.shapes.num_classes = 6
  config.data.augment.flip = 'random'
  config.train.batch_size = 64
  config.train.num_epochs = 10.0
  config.optim.name = 'adamw'
  config.optim.learning_rate = 1e-3
  config.optim.weight_decay = 0.05
  config.optim.schedule = 'cosine'
  config.optim.warmup_epochs = 1.0
  return config
