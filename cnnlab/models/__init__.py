"""The model zoo: a registry of Flax modules by name, and the families that fill it.

  registry    register, create_model, list_models, get_spec, from_config (the model of a config)
  simple      simple_cnn, lenet5, conv_stack (the ablation stack)
  alexnet, vgg, resnet, inception    the classic families, with torchvision's layer sizes
  unet, fcn       segmentation: per-pixel logits (B, H, W, classes)
  localizer       classification + localisation on a backbone: {'logits', 'box'}
  faster_rcnn     detection: Faster R-CNN on a backbone's map (detection_targets: its matching
                  and sampling)
  autoencoder     conv_autoencoder (reconstruction: pixel logits) and conv_encoder, the classifier
                  on its encoder
  backbone        how fcn, localizer and faster_rcnn build a registered classifier as their backbone

A user's architecture is one decorated class in the user's own file (`from cnnlab.models import
register`); see `registry`.
"""

from cnnlab.models.registry import (DTYPES, TASKS, ModelSpec, create_model, from_config, get_spec,
                                    import_modules, list_models, model_kwargs, register)
# They register their models.
from cnnlab.models import (alexnet, autoencoder, faster_rcnn, fcn, inception,  # noqa: F401,E402
                           localizer, resnet, simple, unet, vgg)

__all__ = ['register', 'create_model', 'list_models', 'get_spec', 'import_modules', 'ModelSpec',
           'TASKS', 'DTYPES', 'model_kwargs', 'from_config']
