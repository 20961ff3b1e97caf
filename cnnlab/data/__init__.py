"""cnnlab's data layer: datasets by name, the device and grain pipelines, augmentation.

  load(name, split)            random-access TFDS data source (embedded sets generate themselves)
  info(name)                   DatasetInfo: classes, image shape, split sizes, train mean/std
  prepare(name, data_dir)      what `cnnlab prepare` runs
  DevicePipeline, device_batch the split on the device, batch k drawn inside the jitted step
  GrainPipeline                host pipeline (grain) for data that does not fit, same stream
  make_pipeline(config.data)   the configured one ('device' | 'grain' | 'auto')
  augment.apply / normalize    pure on-device augmentation and normalisation
  check_batch                  first-batch validation against the model's input

The data directory is $CNNLAB_DATA_DIR, else $TFDS_DATA_DIR, else ~/.cache/cnnlab/datasets.
"""

from cnnlab.data import augment
from cnnlab.data.checks import check_batch
from cnnlab.data.config import builder_kwargs, default_config
from cnnlab.data.device import DevicePipeline, device_batch, epoch_permutation, eval_batch
from cnnlab.data.errors import DataError
from cnnlab.data.host import GrainPipeline
from cnnlab.data.pipeline import DEVICE_BUDGET_BYTES, make_pipeline
from cnnlab.data.registry import (DatasetInfo, default_data_dir, info, list_datasets, load,
                                  prepare)

__all__ = [
    'DEVICE_BUDGET_BYTES', 'DataError', 'DatasetInfo', 'DevicePipeline', 'GrainPipeline',
    'augment', 'builder_kwargs', 'check_batch', 'default_config', 'default_data_dir',
    'device_batch', 'epoch_permutation', 'eval_batch', 'info', 'list_datasets', 'load',
    'make_pipeline', 'prepare',
]
