"""Building blocks of convolutional networks, as Flax Linen modules (NHWC, pure init/apply).

  common    argument and shape checks, activations (every ReLU is `relu`, whose backward pass
            `relu_backward` switches for attributions), the choices of norm and pool, the initialiser
  conv      ConvBlock (convolution + norm + activation), conv_block (a partial of it)
  norm      BatchNorm (Flax's, faster on CPU), normalization (batch/group/layer/none), channel_sum
  pool      Pool (max/avg, PyTorch's padding and ceil mode), GlobalPool, AdaptiveAvgPool
  blocks    BasicBlock, Bottleneck, residual_activation, InceptionBlock
  heads     AuxHead (GoogLeNet's auxiliary classifier), MLPHead (AlexNet/VGG classifier), as_logits
  upsample  UpBlock (transposed convolution)

Where XLA:CPU was measured to run a layer's own formulation slowly (batch norm's reductions, max
pooling's select-and-scatter), the layer has a CPU formulation with its gradient written out,
chosen for the platform the computation is compiled for; other platforms run XLA's own.
"""

from cnnlab.layers.blocks import BasicBlock, Bottleneck, InceptionBlock, residual_activation
from cnnlab.layers.common import (ACTIVATIONS, NORMS, POOLS, RELU_BACKWARD, IntOrPair, ModuleDef,
                                  activation, check_choice, he_normal_fan_out, layer_name, pair,
                                  relu, relu_backward)
from cnnlab.layers.conv import ConvBlock, conv_block
from cnnlab.layers.heads import AuxHead, MLPHead, as_logits
from cnnlab.layers.norm import BatchNorm, batch_norm_train, channel_sum, normalization
from cnnlab.layers.pool import AdaptiveAvgPool, GlobalPool, Pool, make_pool, max_pool
from cnnlab.layers.upsample import UpBlock

__all__ = ['ACTIVATIONS', 'NORMS', 'POOLS', 'IntOrPair', 'ModuleDef', 'AdaptiveAvgPool', 'AuxHead',
           'BasicBlock', 'BatchNorm', 'Bottleneck', 'ConvBlock', 'GlobalPool', 'InceptionBlock',
           'MLPHead', 'Pool', 'UpBlock', 'activation', 'as_logits', 'batch_norm_train', 'channel_sum',
           'check_choice', 'conv_block', 'he_normal_fan_out', 'layer_name', 'make_pool',
           'max_pool', 'normalization', 'pair', 'relu', 'relu_backward', 'RELU_BACKWARD',
           'residual_activation']
