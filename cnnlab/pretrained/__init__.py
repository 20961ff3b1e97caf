"""torchvision <-> cnnlab weights, for the zoo models both have (TORCHVISION_ARCHS: alexnet,
vgg11/13/16/19 and their _bn variants, resnet18/34/50/101/152, googlenet with or without its
auxiliary heads).

  convert   from_torchvision(arch, state_dict) -> (model, variables); to_torchvision(arch,
            variables) -> state_dict; the name and layout correspondence, derived per family
  files     load_weights(path, arch): .safetensors (without torch) or .pth/.pt (torch,
            weights_only); read_state_dict(path)
  rundir    save_converted(arch, variables, out_dir): a run directory `load_run` reads

    from cnnlab import pretrained
    model, variables = pretrained.load_weights('resnet50.safetensors', 'resnet50')
    logits = model.apply(variables, images, train=False)  # NHWC, ImageNet-normalised

cnnlab's models are torchvision's layer for layer (padding, ceil-mode pools, adaptive pools,
batch-norm epsilons, ResNet v1.5's strided 3x3), so the logits agree to float32 rounding
(tests/test_pretrained.py). torchvision's ImageNet GoogLeNet weights expect `transform_input=True`.
`cnnlab convert` (cnnlab.pretrained_cli) writes a run directory from a weights file.
"""

from cnnlab.pretrained.convert import (TORCHVISION_ARCHS, WeightsError, from_torchvision, layout,
                                       to_torchvision, unwrap)
from cnnlab.pretrained.files import load_weights, read_state_dict
from cnnlab.pretrained.rundir import IMAGENET_MEAN, IMAGENET_STD, converted_config, save_converted

__all__ = ['TORCHVISION_ARCHS', 'WeightsError', 'from_torchvision', 'to_torchvision', 'layout',
           'unwrap', 'load_weights', 'read_state_dict', 'save_converted', 'converted_config',
           'IMAGENET_MEAN', 'IMAGENET_STD']
