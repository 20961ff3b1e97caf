"""Does a ResNet-18 pretrained on four kinds of shape help with five other kinds? The network of
experiments/pretrain_shapes_resnet18.py (circle, square, triangle, star) transferred to pentagon,
hexagon, cross, diamond and arrow (shapes' first_kind = 4), with 5, 20 and all 100 labelled
training shapes per kind, four ways, 3 seeds each (36 runs), tested on 250 shapes:

  scratch    ResNet-18 trained on those labels only
  probe      the pretrained stem and stages, frozen (weights and batch-norm statistics), under a
             fresh linear classifier (optim.freeze: everything but `head`)
  finetune   the pretrained stem and stages as the initialisation, everything trained
  finetune_lr0.1  the same, the stem and stages at 0.1x the head's learning rate
                  (optim.lr_multipliers)

  cnnlab train --config experiments/pretrain_shapes_resnet18.py \
      --workdir runs/pretrain_shapes_resnet18
  cnnlab sweep --config experiments/transfer_shapes_resnet18.py \
      --root runs/transfer_shapes_resnet18 --workers 2
  cnnlab report runs/transfer_shapes_resnet18

`PRETRAINED` is the first command's --workdir, relative to where the sweep runs. The head is new
in every way (5 classes, not 4; transfer.init_exclude says so). The images are drawn as in the
pretraining (same resolution, scales and fixed normalisation) but from another dataset_seed, so
no background, colour or pose is shared with the source's examples.

Every run trains for the same 30 steps of 8 (240 images): a 5-shot run sees its 25 shapes about
ten times, a run on all 500 sees half of them once. That is what fits on the shared 2-core CPU,
where a ResNet-18 step here takes seconds (a first measurement at 30 steps of 16 took 270 s a
run, 80 minutes for the sweep): equal compute for each way, small, and far from each way at its
best; a from-scratch ResNet-18 in particular has no chance to learn much in 240 images.
"""

from cnnlab import sweeps
from cnnlab.configs import base

PRETRAINED = 'runs/pretrain_shapes_resnet18'
# ResNet-18's stem and stages (stem_conv, stage{i}_block{j}); everything but `head`.
BACKBONE = ('stem_conv', 'stage*')
LEARNING_RATE = 1e-3  # Adam, for training from scratch and fine-tuning everything
# The probe's fresh linear head, and the gentle fine-tuning's (its backbone at 0.1x that, full
# fine-tuning's rate): a linear head on fixed features learns slowly at 1e-3
# (experiments/transfer_digits.py measured it).
HEAD_LEARNING_RATE = 1e-2


def get_config():
  config = base.get_config()
  config.model.name = 'resnet18'
  config.model.stem = 'cifar'
  config.data.name = 'shapes'
  # As experiments/pretrain_shapes_resnet18.py draws them, other kinds and another seed.
  config.data.shapes.resolution = 16
  config.data.shapes.min_scale = 0.5
  config.data.shapes.max_scale = 0.9
  config.data.shapes.first_kind = 4  # SHAPE_NAMES[4:9]: pentagon, hexagon, cross, diamond, arrow
  config.data.shapes.num_classes = 5
  config.data.shapes.num_train = 500  # 100 per kind: "all"
  config.data.shapes.num_test = 250
  config.data.shapes.dataset_seed = 1
  config.data.normalize = 'fixed'  # as in the pretraining, so both see the same input mapping
  config.data.mean = (0.5, 0.5, 0.5)
  config.data.std = (0.2, 0.2, 0.2)
  config.data.examples_per_class = 20
  config.data.augment.flip = 'random'
  config.data.augment.crop_padding = 1
  config.data.augment.crop_mode = 'reflect'
  config.train.batch_size = 8
  config.train.num_steps = 30
  config.train.eval_every_steps = 30  # evaluate at the end only: the table is the final accuracy
  config.train.log_every_steps = 10
  config.optim.name = 'adam'  # as the pretraining
  config.optim.learning_rate = LEARNING_RATE
  config.optim.schedule = 'cosine'
  config.checkpoint.keep = 1
  config.log.progress = 'plain'
  return config


def get_sweep():
  ways = sweeps.transfer_ways(PRETRAINED, BACKBONE, learning_rate=LEARNING_RATE,
                              head_learning_rate=HEAD_LEARNING_RATE)
  return sweeps.with_seeds(sweeps.product(
      sweeps.grid({'data.examples_per_class': [5, 20, 0]}), ways), 3)
