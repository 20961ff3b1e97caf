"""ResNet-18 (torchvision's architecture, CIFAR stem) pretrained on four kinds of shape (circle,
square, triangle, star) at 16x16, the source of experiments/transfer_shapes_resnet18.py, which
transfers it to the five kinds it never sees (pentagon, hexagon, cross, diamond, arrow).

  cnnlab train --config experiments/pretrain_shapes_resnet18.py \
      --workdir runs/pretrain_shapes_resnet18

Measured: 77.7% test accuracy (chance 25%) after 4 epochs of 3,000 shapes, in 42 minutes on the
2-core CPU while other work shared it (6 images/s; 47.7%, 49.3%, 73.3% after epochs 1-3).

Why so small: the CIFAR stem keeps the input's resolution through the first stage, and on this
CPU, shared, ResNet-18 trained at 3-5 images/s at 32x32 (44 alone, bench/README.md) and at 6 at
16x16, so images are 16x16 and 3,000 of them. Shapes are drawn at 0.5-0.9 of the side
(the dataset's default is 0.3-0.6), 8 to 14 pixels across, so that a cross, a diamond or an arrow
is still recognisable. Adam at 1e-3 without warmup: SGD's one-cycle, on a budget of a few hundred
steps, spent its first quarter at rates too small to move (27-31% after about 3,000 images).
"""

from cnnlab.configs import base


def get_config():
  config = base.get_config()
  config.model.name = 'resnet18'
  config.model.stem = 'cifar'  # 3x3/1 stem, no pooling: stage 1 works at the input's 16x16
  config.data.name = 'shapes'
  config.data.shapes.resolution = 16
  config.data.shapes.num_classes = 4  # SHAPE_NAMES[0:4]: circle, square, triangle, star
  config.data.shapes.first_kind = 0
  config.data.shapes.num_train = 3000
  config.data.shapes.num_test = 300
  config.data.shapes.min_scale = 0.5  # of the side; the transfer draws its shapes the same way
  config.data.shapes.max_scale = 0.9
  # Fixed, about the shapes' per-channel mean and std (0.50 and 0.20), so the transfer runs can
  # normalise exactly as this run did.
  config.data.normalize = 'fixed'
  config.data.mean = (0.5, 0.5, 0.5)
  config.data.std = (0.2, 0.2, 0.2)
  config.data.augment.flip = 'random'  # every kind is its own mirror image, up to rotation
  config.data.augment.crop_padding = 1
  config.data.augment.crop_mode = 'reflect'
  config.train.batch_size = 16  # small: on a budget of images, more steps learn more
  config.train.num_epochs = 4.0
  config.train.eval_every_steps = 187  # once per epoch (3,000 // 16 steps)
  config.train.log_every_steps = 21
  config.optim.name = 'adam'
  config.optim.learning_rate = 1e-3
  config.optim.schedule = 'cosine'
  config.checkpoint.keep = 1
  return config
