"""The model zoo: a registry of Flax modules by name, and the families that fill it.

  registry    register, create_model, list_models, get_spec, from_config (the model of a config)
  simple      simple_cnn, lenet5, conv_stack (the ablation stack)
  alexnet, vgg, resnet, inception    the classic families, with torchvision's layer sizes

A user's architecture is one decorated class in the user's own file (`from cnnlab.models import
register`); see `registry`.
"""

from cnnlab.models.registry import (DTYPES, ModelSpec, create_model, from_config, get_spec,
                                    import_modules, list_models, model_kwargs, register)
from cnnlab.models import alexnet, inception, resnet, simple, vgg  # noqa: F401,E402  (they register)

__all__ = ['register', 'create_model', 'list_models', 'get_spec', 'import_modules', 'ModelSpec',
           'DTYPES', 'model_kwargs', 'from_config']
