"""The `data` section of an experiment config: every knob the data layer reads, with its unit.

`cnnlab/configs/base.py` calls `default_config()` for `config.data`; experiments change values, never
add keys. Library code reads these keys directly (`config.augment.flip`), so a missing or misspelt
key is an error, not a silent default.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def augment_config() -> ml_collections.ConfigDict:
  """`config.data.augment`: on-device training augmentation (`cnnlab.data.augment.apply`).

  Every transform is off at its zero value. They run in this order: crop, translate, affine
  (rotate, scale, shear, elastic: one bilinear resampling), flip, cutout, mixup/cutmix. Masks and
  boxes follow their images through the geometric ones.
  """
  c = ml_collections.ConfigDict()
  # Random crop after padding every side by this many pixels (CIFAR recipe: 4); 0 = off.
  # Equivalent to a random shift of up to `crop_padding` pixels in each direction.
  c.crop_padding = 0
  # What fills the padding of the crop: 'zero' (black) or 'reflect' (mirror of the border).
  c.crop_mode = 'zero'
  # Random shift of up to this many pixels along each axis, zero-filled; 0 = off. For
  # translation-invariance experiments, where shifts are larger than a crop's padding.
  c.translate = 0
  # Random rotation by an angle uniform in [-rotate, +rotate] degrees about the centre; 0 = off.
  c.rotate = 0.0
  # Random zoom by a factor uniform in [1 - scale, 1 + scale] about the centre; 0 = off, < 1.
  c.scale = 0.0
  # Random shear along x by an angle uniform in [-shear, +shear] degrees; 0 = off.
  c.shear = 0.0
  # Elastic distortion (Simard et al. 2003): a per-pixel uniform [-1, 1] field smoothed by a
  # unit-sum Gaussian of std `elastic_sigma` pixels, times `elastic_alpha` pixels; 0 = off.
  # Their MNIST setting, alpha 34 and sigma 4, moves pixels by about 1.4 px rms.
  c.elastic_alpha = 0.0
  c.elastic_sigma = 4.0
  # Horizontal flip: 'none'; 'random' (each example with probability 1/2); 'alternate' (the
  # derandomised flip: a fixed random half of the examples is flipped in even epochs, the other
  # half in odd ones, so every example is seen both ways every two epochs).
  c.flip = 'none'
  # Cutout: zero a square of this side in pixels at a uniformly random centre (clipped at the
  # border); 0 = off. Labels, masks and boxes are unchanged.
  c.cutout = 0
  # Mixup: blend each example with its partner (the batch reversed), weight lambda ~ Beta(a, a)
  # folded to >= 0.5; this is `a` (0.2 is common); 0 = off. Adds `label_mix` and `mix_weight`.
  c.mixup_alpha = 0.0
  # CutMix: paste a box of the partner covering a Beta(a, a) fraction of the area; this is `a`
  # (1.0 is common); 0 = off. With mixup also on, each example gets one of the two at random.
  c.cutmix_alpha = 0.0
  return c


def shapes_config() -> ml_collections.ConfigDict:
  """`config.data.shapes`: the procedural `shapes` dataset (used when `name == 'shapes'`)."""
  c = ml_collections.ConfigDict()
  c.resolution = 64  # image side in pixels (images are square, RGB)
  c.num_classes = 4  # how many shape kinds, <= 9: circle, square, triangle, star, pentagon, ...
  # Index in that list of the first kind drawn: the kinds are SHAPE_NAMES[first_kind:first_kind +
  # num_classes] (label 0 is kind first_kind), so 4 with num_classes 5 draws the 5 kinds a
  # 4-kind dataset never shows, for transfer learning. 0 keeps the datasets' names and caches.
  c.first_kind = 0
  c.num_train = 10_000  # examples in the `train` split
  c.num_test = 2_000  # examples in the `test` split
  # Generation seed; the dataset is a pure function of these settings. (Batch order comes from
  # the training seed, not this one.)
  c.dataset_seed = 0
  c.min_scale = 0.3  # smallest shape size, as a fraction of the image side (circumscribed circle)
  c.max_scale = 0.6  # largest shape size, same unit
  c.max_rotation = 180.0  # shapes are rotated uniformly in [-max_rotation, +max_rotation] degrees
  # Where shape centres are drawn: 'random' (anywhere the shape fits), 'center', or 'split'
  # (train shapes in the left half, test shapes in the right: a translation-invariance probe).
  c.position = 'random'
  # Several shapes per image, for object detection: each example holds min_objects..max_objects
  # shapes (uniformly many) with `labels` (N,), `boxes` (N, 4), `num_objects` and `instances`
  # instead of `label` and `bbox`, N = max_objects (`cnnlab.data.shapes`). 0 = one shape per image
  # (the classification form; min_objects and max_overlap are then unused). Suggested: 6 at
  # resolution 64 with scales 0.15 to 0.35.
  c.max_objects = 0
  c.min_objects = 1  # fewest shapes in an image (0 allowed: images of background alone)
  # Largest intersection over union allowed between two objects' boxes (visible pixels); a shape
  # is re-drawn until it fits (and until every object keeps >= 4 pixels and 25% of its own).
  c.max_overlap = 0.3
  return c


def synthetic_config() -> ml_collections.ConfigDict:
  """`config.data.synthetic`: random images for benchmarks (used when `name == 'synthetic'`)."""
  c = ml_collections.ConfigDict()
  c.image_shape = (224, 224, 3)  # (height, width, channels) in pixels
  c.num_classes = 1000
  c.num_examples = 1024  # examples per split (generated on the device, so keep it small)
  c.dataset_seed = 0  # generation seed (batch order comes from the training seed)
  return c


def default_config() -> ml_collections.ConfigDict:
  """The `data` section with every key and its default."""
  c = ml_collections.ConfigDict()
  # Dataset name: embedded ('digits', 'mnist5k', 'shapes', 'synthetic') or public TFDS ('mnist',
  # 'cifar10', 'imagenet2012', ...); `cnnlab.data.list_datasets()` lists them.
  c.name = 'mnist5k'
  # Where datasets live. None = $CNNLAB_DATA_DIR, else $TFDS_DATA_DIR, else
  # ~/.cache/cnnlab/datasets (`cnnlab.data.default_data_dir()`).
  c.data_dir = config_dict.placeholder(str)
  # Batch source: 'device' (the whole split in accelerator memory, batches gathered inside the
  # jitted step), 'grain' (host pipeline with worker processes, for data that does not fit), or
  # 'auto' ('device' when the split's uint8 arrays fit `cnnlab.data.DEVICE_BUDGET_BYTES`, 2 GiB).
  c.pipeline = 'auto'
  c.train_split = 'train'
  # Scarce labels: train on only the first N examples of each class of the train split (in stored
  # order, so 10 per class is a subset of 100 per class); 0 = all. Device pipeline only.
  c.examples_per_class = 0
  c.eval_split = 'test'  # 'validation' for imagenette and imagenet2012
  # Side in pixels that variable-size images (imagenette, imagenet2012) are resized to: shorter
  # side to this, then a centre crop to a square. None = keep the native size (fixed-size sets).
  c.image_size = config_dict.placeholder(int)
  # Input normalisation, (x / 255 - mean) / std per channel: 'dataset' (mean/std of the train
  # split, stored with the dataset), 'fixed' (the `mean`/`std` below) or 'none' (x / 255 only).
  c.normalize = 'dataset'
  c.mean = (0.5, 0.5, 0.5)  # per channel, 0..1 scale; used when normalize == 'fixed'
  c.std = (0.5, 0.5, 0.5)  # per channel, 0..1 scale; used when normalize == 'fixed'
  c.grain_workers = 0  # grain pipeline: worker processes decoding records (0 = in the main process)
  c.grain_prefetch = 2  # grain pipeline: global batches prepared ahead of the step
  c.augment = augment_config()
  c.shapes = shapes_config()
  c.synthetic = synthetic_config()
  return c


def builder_kwargs(config_data: ml_collections.ConfigDict) -> dict:
  """The builder options for `config_data.name` (the `shapes`/`synthetic` subsection, else {})."""
  if config_data.name == 'shapes':
    return config_data.shapes.to_dict()
  if config_data.name == 'synthetic':
    kwargs = config_data.synthetic.to_dict()
    kwargs['image_shape'] = tuple(kwargs['image_shape'])
    return kwargs
  return {}
