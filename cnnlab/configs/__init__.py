"""cnnlab's base config: every key the code reads, with its unit and default.

An experiment file, in this repository or in a user's own, builds on it:

    from cnnlab.configs import base

    def get_config():
      config = base.get_config()
      config.model.name = 'resnet20'
      ...
      return config
"""
