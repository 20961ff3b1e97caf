"""The kernel x stride x pooling ablation on procedural shapes (32x32 RGB, 4 classes) instead of
digits: shapes vary in position, scale and rotation, so the receptive field matters more.

  cnnlab sweep --config experiments/ablation_kernel_stride_pool_shapes.py --root runs/ablation_shapes --workers 2
  cnnlab report runs/ablation_shapes

Same grid, network and schedule as experiments/ablation_kernel_stride_pool.py (54 runs), 3 epochs
of 10,000 images evaluated on 2,000: about 2.5x the images of the mnist5k sweep, at 32x32x3.
Not measured yet.
"""

import ablation_kernel_stride_pool as mnist

get_sweep = mnist.get_sweep


def get_config():
  config = mnist.get_config()
  config.data.name = 'shapes'
  config.data.shapes.resolution = 32
  config.data.shapes.num_classes = 4
  return config
