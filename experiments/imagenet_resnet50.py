"""ResNet-50 on ImageNet (ILSVRC 2012) through the Grain host pipeline, bfloat16 compute.

  # once: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in ~/imagenet-manual, then
  cnnlab prepare imagenet2012 --data-dir /data/tfds   (TFDS_MANUAL_DIR=~/imagenet-manual)
  cnnlab train --config experiments/imagenet_resnet50.py --workdir runs/r50 \
      --config.data.data_dir=/data/tfds

The recipe of Goyal et al. 2017: batch 1024, SGD momentum, lr 0.4 (0.1 per 256) with 5 warmup
epochs, cosine to 0, weight decay 5e-5 off the norms, label smoothing 0.1, last-norm zero init.
"""

from cnnlab.configs import base


def get_config():
  config = base.get_config()
  config.dtype = 'bfloat16'
  config.model.name = 'resnet50'
  config.model.zero_init_last = True
  config.data.name = 'imagenet2012'
  config.data.pipeline = 'grain'
  config.data.eval_split = 'validation'
  config.data.image_size = 224
  config.data.grain_workers = 8
  config.data.augment.flip = 'random'
  config.data.augment.crop_padding = 16
  config.train.batch_size = 1024
  config.train.num_epochs = 90.0
  config.train.eval_every_steps = 5000
  config.train.log_every_steps = 100
  config.train.label_smoothing = 0.1
  config.optim.name = 'sgd'
  config.optim.learning_rate = 0.4
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 5e-5
  config.optim.schedule = 'cosine'
  config.optim.warmup_epochs = 5.0
  config.checkpoint.every_steps = 5000
  return config
