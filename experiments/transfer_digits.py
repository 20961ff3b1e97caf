"""Does a network trained on mnist5k help on scikit-learn's `digits` (8x8 scans of other writers'
digits, resized to 28x28)? 5, 20 and all (about 144) labelled training digits per class, four
ways, 3 seeds each (36 runs), tested on digits' 355 test digits:

  scratch    the quickstart's network trained on those labels only
  probe      the quickstart run's backbone, frozen (weights and batch-norm statistics), under a
             fresh linear classifier (optim.freeze = ('stage*',): everything but `head`)
  finetune   the quickstart run's backbone as the initialisation, everything trained
  finetune_lr0.1  the same, the backbone at 0.1x the head's learning rate (optim.lr_multipliers)

  cnnlab train --config experiments/quickstart.py --workdir runs/quickstart
  cnnlab sweep --config experiments/transfer_digits.py --root runs/transfer_digits --workers 2
  cnnlab report runs/transfer_digits

`QUICKSTART` is the first command's --workdir, relative to where the sweep runs.

The head is re-initialised (transfer.init_exclude = ('head',)) although both datasets have the
classes 0..9 in the same order: then the four ways differ only in what the backbone starts from
and how it trains, and the probe is the textbook one, a linear classifier trained on frozen
features. Keeping the quickstart's head would mix in how well mnist5k's classifier already works
on digits, a different question, and a poor start: as it stands the quickstart run calls almost
every resized digit an 8 (11% of digits' test split).

Inputs are normalised with mnist5k's statistics (data.normalize = 'fixed'), not digits' own: the
quickstart saw (x - 0.1311) / 0.3083, so a blank pixel means the same to the transferred
convolutions and, in the probe, to the frozen batch-norm statistics that follow them. Digits'
pixels are 0..16 scaled to 0..255 (mean 0.305, std 0.376 at 8x8: more ink and grey levels than
MNIST's 0.131 and 0.308), and a digit fills its 8x8 frame where an MNIST digit sits in the central
20x20 of 28x28, so even at 28x28 the two sets differ in stroke width, size and blur. Every way,
scratch included, sees the same inputs and trains for the same 200 steps of 50 with Adam; the
learning rates are below.
"""

import quickstart  # experiments/quickstart.py: the source run's config

from cnnlab import sweeps
from cnnlab.configs import base

QUICKSTART = 'runs/quickstart'
# mnist5k's train-split mean and std (its metadata.json), which the quickstart normalised with.
MNIST5K_MEAN = (0.1311,)
MNIST5K_STD = (0.3083,)
# The quickstart's conv_stack is stage1_conv1, stage2_conv1, stage3_conv1, then `head`.
BACKBONE = ('stage*',)
LEARNING_RATE = 1e-3  # Adam, for training from scratch and fine-tuning everything
# A fresh linear head on frozen (or nearly frozen) features learns slowly at 1e-3: measured on all
# of digits, the probe's training loss was still falling after the 200 steps (1.08) and it tested
# at 77 +- 8% over 3 seeds; seed 0 went from 86% to 97% at 1e-2. So the probe trains at 1e-2, and
# so does the gentle fine-tuning's head, its backbone at 0.1x that: full fine-tuning's rate.
HEAD_LEARNING_RATE = 1e-2


def get_config():
  config = base.get_config()
  # The quickstart's network, so every tensor has its source's shape.
  config.model = quickstart.get_config().model
  config.data.name = 'digits'
  config.data.image_size = 28  # 8x8 -> 28x28, the quickstart's input size
  config.data.normalize = 'fixed'
  config.data.mean = MNIST5K_MEAN
  config.data.std = MNIST5K_STD
  config.data.examples_per_class = 20
  config.data.augment.translate = 2  # pixels
  config.train.batch_size = 50
  config.train.num_steps = 200
  config.train.eval_every_steps = 100
  config.train.log_every_steps = 50
  config.optim.name = 'adam'
  config.optim.learning_rate = LEARNING_RATE
  config.optim.schedule = 'cosine'
  config.checkpoint.keep = 1
  config.log.progress = 'plain'
  return config


def get_sweep():
  ways = sweeps.transfer_ways(QUICKSTART, BACKBONE, learning_rate=LEARNING_RATE,
                              head_learning_rate=HEAD_LEARNING_RATE)
  return sweeps.with_seeds(sweeps.product(
      sweeps.grid({'data.examples_per_class': [5, 20, 0]}), ways), 3)
