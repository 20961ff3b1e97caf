"""A convolutional autoencoder on mnist5k's 4,000 training digits, without their labels: strided
convolutions down to a 7x7x32 code, transposed convolutions back, binary cross-entropy on the
0..1 pixels; scored by PSNR on the 1,000 test digits.

  cnnlab train --config experiments/autoencoder_mnist5k.py --workdir runs/autoencoder_mnist5k

Its encoder is the `conv_encoder` classifier's (the same parameter paths under 'encoder'), so it
initialises classifiers that see few labels: experiments/embeddings_mnist5k.py measures how much
that helps (README, "Autoencoders and embeddings").
"""

from cnnlab.configs import base


def get_config():
  config = base.get_config()
  config.task.name = 'reconstruction'
  config.task.pixel_loss = 'bce'  # digits are nearly binary
  config.model.name = 'conv_autoencoder'
  config.model.features = (32, 32)
  config.model.downsample = 'stride'
  config.model.noise_std = 0.0  # > 0: a denoising autoencoder
  config.data.name = 'mnist5k'
  config.data.normalize = 'none'  # the input is the 0..1 image the output reconstructs
  config.data.augment.translate = 2
  config.train.batch_size = 128
  config.train.num_epochs = 20.0
  config.train.log_every_steps = 31
  config.optim.name = 'adam'
  config.optim.learning_rate = 2e-3
  config.optim.schedule = 'cosine'
  config.checkpoint.keep = 1
  return config
