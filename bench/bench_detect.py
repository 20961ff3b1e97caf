"""Faster R-CNN: cnnlab's detect_shapes experiment against torchvision's FasterRCNN, same data.

Test COCO AP and training images/s of both, in one run, each trained on the same batches with a
model of the same size (a benchmark, never a test).

  python bench/bench_detect.py --json bench_detect.json        # the shipped experiment, both sides
  python bench/bench_detect.py --peers torch --torch-threads 2  # the PyTorch side alone
  python bench/bench_detect.py --epochs 0.02 --num-train 64 --num-test 32 \
      --workdir /tmp/bdsmoke                                   # smoke run: one step a side

The experiment is experiments/detect_shapes.py (64x64 `shapes`, one to six objects of four kinds,
4,000 training and 1,000 test images, batch 32, 5 epochs = 625 steps; Adam 2e-3, cosine schedule
after 0.5 epoch of linear warmup; random horizontal flips). By default nothing of it changes;
--epochs, --num-train, --num-test and --seed override it for both sides (as `--config.` keys).
Each side runs in its own subprocess, one after the other (cnnlab first: it generates the dataset
when it is not cached yet); their output streams to the console and to WORKDIR/{cnnlab,torch}.log.

cnnlab  `cnnlab train --config experiments/detect_shapes.py --workdir WORKDIR/cnnlab` (the CLI's
        own entry, `python -m cnnlab.cli`), plus `compilation_cache_dir=''` so that it compiles
        cold, as a first run does. Its figures are read from the run directory: test AP, AP50,
        AP75 and AR100 of the final evaluation (summary.json's `final_eval`, after the last
        step; every evaluation is in metrics.jsonl), images/s = summary.json's `images_per_sec`
        (images trained / training time: the step is compiled ahead, so no compilation is in
        it, and evaluations are excluded; the first step is in it), `train_time_s`,
        `eval_time_s`, `compile_time_s`, the parameter count.
torch   torchvision.models.detection.FasterRCNN, eager, built from cnnlab's model settings
        (the Flax module `cnnlab.models.from_config` makes of the config, so every threshold and
        size is read, not copied):
          backbone   conv_stack's twin: per stage a 3x3 SAME conv without bias (batch norm
                     follows), BatchNorm2d (momentum 0.1 = Flax's 0.9, eps 1e-5), ReLU, then a
                     2x2 max pool where the config pools: 32, 64, 128 filters, pools
                     (max, max, none) -> a 16x16x128 map at stride 4;
          RPN        AnchorGenerator(sizes (8, 16, 32), ratios (0.5, 1, 2)), RPNHead (3x3 conv +
                     ReLU, 1x1 objectness and deltas), pre-NMS top-n 1000 / 500 (train / test),
                     post-NMS 64 / 64, NMS 0.7, fg / bg IoU 0.7 / 0.3, 256 anchors per image, half
                     positive;
          RoI heads  MultiScaleRoIAlign(output 5, sampling ratio 2, aligned=False), TwoMLPHead
                     (3200 -> 128 -> 128), FastRCNNPredictor(128, 4 + 1 background), box coder
                     weights (10, 10, 5, 5), 32 RoIs per image, a quarter positive, fg / bg IoU
                     0.5 / 0.5; detections: score > 0.05, NMS 0.5 per class, 20 per image;
          transform  GeneralizedRCNNTransform with min_size = max_size = 64, mean 0, std 1: the
                     network sees the 64x64 images it is given (a resize at scale 1 is the
                     identity), already normalised as cnnlab normalises them.
        Parameters: 676,326 on both sides (backbone 93,472, RPN head 153,389, box head and
        predictor 429,465; the child asserts the twin's count equal to cnnlab's of the config).
        Initialisation: as cnnlab's (--torch-init cnnlab, the default): backbone convs He normal
        over fan-out, batch norm 1 / 0, RPN head N(0, 0.01) (torchvision's own, the same), the
        MLP head's layers LeCun truncated normal, the predictor N(0, 0.01) / N(0, 0.001) (cnnlab
        starts them as Detectron does; torchvision's stock predictor and MLP head would use
        PyTorch's default Linear init: --torch-init torchvision), every bias 0. Same
        distributions, other draws.
        Data: the very stream cnnlab trains on. The splits are read with cnnlab's own data code
        (`cnnlab.data`, the config's `data.shapes` settings), and each step's example indices and
        flips are cnnlab's: its device pipeline's batch order (`cnnlab.data.device_batch`, from
        the seed) and its train step's augmentation key (`cnnlab.train.step.preprocess`, from the
        run's rng), drawn by cnnlab's code on 1x2 probe images whose flip is visible. The images
        are normalised as cnnlab's step does ((x / 255 - mean) / std with the training split's
        per-channel mean and std) and flipped with their boxes; tests/test_bench.py checks that
        a batch equals cnnlab's preprocessed one.
        Optimiser: torch.optim.Adam(lr 2e-3, betas (0.9, 0.999), eps 1e-8, no weight decay) with
        LambdaLR following cnnlab's schedule (cnnlab.train.optim: linear warmup from 0 over
        round(0.5 * steps per epoch) = 62 steps, then cosine to 0 over the remaining 563; step
        k's rate is that of count k, 0 at the first step as in optax; tests/test_bench.py checks
        it against cnnlab's function). Loss: torchvision's four losses summed, weight 1 each,
        which are cnnlab's (cnnlab.tasks.detection). Same batch (32), same steps
        (ceil(epochs * (N // 32))), so both sides see the same images.
        Evaluation: at cnnlab's evaluation steps (every train.eval_every_steps and after the last
        step), on the test split in stored order, the detections scored by cnnlab's own
        evaluation: the detection task's accumulate / finalize (cnnlab.tasks.coco_eval, COCO's
        numbers) on boxes converted to cnnlab's (ymin, xmin, ymax, xmax) image fractions.
        images/s = 32 x (steps - 1) / the time of every step but the first (a step: building the
        batch, forward, backward, Adam, scheduler; evaluation excluded; cnnlab's batch order and
        flips are drawn before the first step, untimed). --torch-threads N sets
        torch.set_num_threads (default 0: torch's own choice, 2 on the 2-core CPU machine; the
        JSON records it). On a GPU (--device gpu, or auto with nvidia-smi) cnnlab's JAX and
        torch use it; each step is then waited for (cuda.synchronize).

What the two sides do not share (none of it changes the amount of work, the data or the model):
  - random draws: the initial weights and the RPN's and RoI heads' samples of anchors and RoIs
    come from each framework's own generator (same distributions);
  - batch norm's running variance: PyTorch averages the unbiased batch variance, Flax the biased
    one (N / (N - 1), N >= 32 x 16 x 16 per channel: 1.2e-4 relative at most, evaluation only);
  - kernels: XLA against oneDNN/ATen and torchvision's C++ roi_align and nms (NMS ties may break
    differently); cnnlab pads proposals and detections to static shapes, torchvision's are
    variable-length;
  - torchvision's transform runs per image (a scale-1 interpolation each), inside torch's steps.

Table: test AP50, AP (IoU .50:.95), AP75, AR100 after the last step; training images/s; training,
evaluation and wall seconds (wall: the side's whole subprocess, imports, data loading, compilation
and evaluations included, and generating the dataset when the run had to). The JSON (--json) has
every figure: all twelve COCO numbers, the evaluations along the way, the logged losses, step times
and load averages.

Smoke runs compile cnnlab's model (about a minute on 2 cores) and generate their small dataset;
their figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import types

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
if BENCH_DIR not in sys.path:
  sys.path.insert(0, BENCH_DIR)

import bench_train  # noqa: E402  (stdlib only at module level)

EXPERIMENT = 'experiments/detect_shapes.py'
PEERS = ('cnnlab', 'torch')
ANSI_ESCAPE = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')
COCO_KEYS = ('AP', 'AP50', 'AP75', 'AR100')
# torchvision's loss names -> cnnlab's (cnnlab.tasks.detection's train metrics)
LOSS_NAMES = {'loss_objectness': 'rpn_objectness', 'loss_rpn_box_reg': 'rpn_box',
              'loss_classifier': 'roi_class', 'loss_box_reg': 'roi_box'}
# Augmentation keys the torch side does not replicate: each must stay at its zero value.
UNSUPPORTED_AUGMENT = ('crop_padding', 'translate', 'rotate', 'scale', 'shear', 'elastic_alpha',
                       'cutout', 'mixup_alpha', 'cutmix_alpha')


# ---------------------------------------------------------------------------------------------
# The experiment and cnnlab's view of it (imported by the torch child and by tests).

def bench_overrides(*, epochs: float | None = None, num_train: int | None = None,
                    num_test: int | None = None, seed: int | None = None) -> list[str]:
  """The `--config.` overrides (KEY=VALUE) of both sides; none by default."""
  out = []
  if epochs is not None:
    out.append(f'train.num_epochs={float(epochs)!r}')
  if num_train is not None:
    out.append(f'data.shapes.num_train={int(num_train)}')
  if num_test is not None:
    out.append(f'data.shapes.num_test={int(num_test)}')
  if seed is not None:
    out.append(f'seed={int(seed)}')
  return out


def experiment_config(overrides=()):
  """experiments/detect_shapes.py with `overrides` (KEY=VALUE strings), as `cnnlab train` loads
  it."""
  from cnnlab import config as config_lib
  return config_lib.load(os.path.join(ROOT, EXPERIMENT), list(overrides))


def check_supported(config) -> None:
  """SystemExit naming what the torch side cannot replicate, if the config uses it."""
  problems = []
  aug = config.data.augment
  problems += [f'data.augment.{k}={aug[k]!r}' for k in UNSUPPORTED_AUGMENT if aug[k]]
  if aug.flip not in ('none', 'random', 'alternate'):
    problems.append(f'data.augment.flip={aug.flip!r}')
  c = config.optim
  if c.name != 'adam':
    problems.append(f'optim.name={c.name!r} (adam only)')
  if c.schedule not in ('cosine', 'constant'):
    problems.append(f'optim.schedule={c.schedule!r} (cosine or constant)')
  for key in ('weight_decay', 'clip_norm', 'ema_decay'):
    if c[key]:
      problems.append(f'optim.{key}={c[key]!r} (0 only)')
  if c.freeze or c.lr_multipliers:
    problems.append('optim.freeze / optim.lr_multipliers')
  if config.dtype != 'float32':
    problems.append(f'dtype={config.dtype!r} (float32 only)')
  if config.model.name != 'faster_rcnn':
    problems.append(f'model.name={config.model.name!r}')
  if problems:
    raise SystemExit('bench_detect: the torch side does not replicate ' + ', '.join(problems))


def cnnlab_model(config, num_classes: int):
  """The Flax FasterRCNN the config builds (its attributes are the settings the twin copies)."""
  from cnnlab import models
  return models.from_config(config, num_classes)


def backbone_settings(model) -> dict:
  """conv_stack's effective arguments in the detector (its defaults, the detector's, the
  config's), per stage."""
  from cnnlab.models import backbone as backbone_lib, faster_rcnn, registry
  if model.backbone != 'conv_stack':
    raise SystemExit(f'bench_detect: the torch twin is of conv_stack, the config has backbone '
                     f'{model.backbone!r}')
  args = {**backbone_lib.BACKBONE_DEFAULTS.get('conv_stack', {}),
          **faster_rcnn.DETECTION_BACKBONE_DEFAULTS.get('conv_stack', {}),
          **dict(model.backbone_args)}
  stack = registry.get_spec('conv_stack').factory(**args, features_only=True, num_classes=0)
  stages = len(stack.filters)
  level = model.feature_level % stages
  per_stage = {name: stack.per_stage(name)[:level + 1] for name in (
      'kernel_size', 'stride', 'padding', 'pool', 'pool_size', 'pool_stride')}
  return {'filters': tuple(stack.filters[:level + 1]), 'convs_per_stage': stack.convs_per_stage,
          'norm': stack.norm, 'act': stack.act, **per_stage,
          'feature_stride': stack.feature_reductions()[level]}


def load_split(config, split: str) -> tuple[dict, object]:
  """({'image' (N, H, W, C) uint8, 'labels' (N, M) int32, 'boxes' (N, M, 4) float32 (ymin, xmin,
  ymax, xmax) in [0, 1], 'num_objects' (N,) int32}, DatasetInfo) of one split, read by cnnlab's
  own data code from the config's dataset (generated first if it is not cached)."""
  from cnnlab.data import config as data_config, registry, sources
  kwargs = data_config.builder_kwargs(config.data)
  info = registry.info(config.data.name, data_dir=config.data.data_dir,
                       image_size=config.data.image_size, **kwargs)
  source = registry.load(config.data.name, split, data_dir=config.data.data_dir, **kwargs)
  arrays = sources.read_split(info, split, source, image_size=config.data.image_size)
  return {k: arrays[k] for k in ('image', 'labels', 'boxes', 'num_objects')}, info


def normalization(config, info) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) per channel, 0..1 scale, as cnnlab's step normalises (config.data.normalize)."""
  from cnnlab.data import augment
  return augment.normalization(config.data, info)


def schedule_steps(config, num_train: int) -> tuple[int, int]:
  """(total steps, steps per epoch) as cnnlab.train.loop.setup computes them."""
  from cnnlab.data import device
  steps_per_epoch = device.check_batch_size(config.train.batch_size, num_train)
  total = config.train.num_steps or math.ceil(config.train.num_epochs * steps_per_epoch)
  return total, steps_per_epoch


def lr_factors(config, total_steps: int, steps_per_epoch: int) -> list[float]:
  """Learning rate / peak at counts 0 .. total_steps - 1: cnnlab.train.optim's schedule (linear
  warmup from 0 over round(warmup_epochs * steps per epoch) steps, at most total - 1, then a
  cosine to end_lr_fraction over the rest, or constant), for torch's LambdaLR."""
  c = config.optim
  total = max(total_steps, 1)
  warmup = min(int(round(c.warmup_epochs * steps_per_epoch)), total - 1) if c.warmup_epochs else 0
  rest = total - warmup

  def factor(count: int) -> float:
    if count < warmup:
      return count / warmup
    if c.schedule == 'constant':
      return 1.0
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(count - warmup, rest) / rest))
    return (1.0 - c.end_lr_fraction) * cosine + c.end_lr_fraction
  return [factor(k) for k in range(total)]


def run_state(seed: int):
  """A TrainState whose `rng` and `step` are those a cnnlab run of `seed` starts with
  (cnnlab.train.state.create; its rng does not depend on the model, here a one-unit probe)."""
  import flax.linen as nn
  import optax
  from cnnlab.train import state as state_lib

  class Probe(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(1)(x)
  return state_lib.create(Probe(), optax.identity(), seed=seed, input_shape=(1, 2, 1), ema=False)


def cnnlab_stream(config, num_examples: int, steps: int) -> tuple:
  """(indices (steps, B) int64, flips (steps, B) bool): the training examples of each step and
  which of them are flipped, as cnnlab's run draws them. cnnlab's own code draws them: its device
  pipeline's order (`cnnlab.data.device_batch`) and its train step's augmentation
  (`cnnlab.train.step.preprocess`, keyed by the state's rng and step), here on 1x2 probe images
  [0, 255] whose first pixel says whether the example was flipped."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from cnnlab import data
  from cnnlab.train import step as step_lib

  batch = config.train.batch_size
  state = run_state(config.seed)
  arrays = {'image': np.tile(np.asarray([0, 255], np.uint8).reshape(1, 1, 2, 1),
                             (num_examples, 1, 1, 1)),
            'position': np.arange(num_examples, dtype=np.int32)}
  settings = types.SimpleNamespace(augment=config.data.augment.to_dict(), mean=(0.0,),
                                   std=(1.0,), compute_dtype=jnp.float32)

  @jax.jit
  def draw(arrays, step):
    b = data.device_batch(arrays, step, seed=config.seed, batch_size=batch,
                          num_examples=num_examples)
    images, b = step_lib.preprocess(state.replace(step=step), b, settings)
    return b['position'], images[:, 0, 0, 0] > 0.5

  drawn = [draw(arrays, jnp.int32(k)) for k in range(steps)]
  indices = np.stack([np.asarray(i) for i, _ in drawn]).astype(np.int64).reshape(steps, batch)
  flips = np.stack([np.asarray(f) for _, f in drawn]).astype(bool).reshape(steps, batch)
  return indices, flips


def detection_task(config, info):
  """cnnlab's detection task of the config (what scores its runs)."""
  from cnnlab import tasks
  return tasks.create(config, info.num_classes, info.class_names)


# ---------------------------------------------------------------------------------------------
# The PyTorch twin.

def build_torch_model(config, num_classes: int, init: str = 'cnnlab'):
  """torchvision's FasterRCNN with the settings of cnnlab's model under `config` (module
  docstring); `init` 'cnnlab' (cnnlab's initial distributions) or 'torchvision' (its own)."""
  import torch.nn as tnn
  from torchvision.models.detection import FasterRCNN
  from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
  from torchvision.models.detection.rpn import AnchorGenerator, RPNHead
  from torchvision.ops import MultiScaleRoIAlign
  from cnnlab.models import faster_rcnn

  m = cnnlab_model(config, num_classes)
  s = backbone_settings(m)
  if s['norm'] not in ('batch', 'none') or s['act'] != 'relu':
    raise SystemExit(f"bench_detect: the twin's stages are conv + batch norm (or none) + ReLU; "
                     f"the config has norm={s['norm']!r}, act={s['act']!r}")
  layers, channels = [], 3
  for i, features in enumerate(s['filters']):
    kernel, stride, padding = s['kernel_size'][i], s['stride'][i], s['padding'][i]
    if padding != 'SAME' or kernel % 2 == 0 or stride != 1:
      raise SystemExit(f'bench_detect: the twin builds odd SAME convolutions of stride 1; stage '
                       f'{i + 1} has kernel {kernel}, padding {padding!r}, stride {stride}')
    for _ in range(s['convs_per_stage']):
      bias = s['norm'] == 'none'
      layers.append(tnn.Conv2d(channels, features, kernel, padding=kernel // 2, bias=bias))
      if s['norm'] == 'batch':
        layers.append(tnn.BatchNorm2d(features, eps=1e-5, momentum=0.1))
      layers.append(tnn.ReLU(inplace=True))
      channels = features
    pool, size, pool_stride = s['pool'][i], s['pool_size'][i], s['pool_stride'][i]
    if pool != 'none':
      pool_cls = tnn.MaxPool2d if pool == 'max' else tnn.AvgPool2d
      layers.append(pool_cls(size, pool_stride or size))
  backbone = tnn.Sequential(*layers)
  backbone.out_channels = channels
  wy, wx, wh, ww = faster_rcnn.BOX_WEIGHTS
  if m.rpn_min_size != 1e-3:
    raise SystemExit(f'bench_detect: torchvision fixes the RPN min size at 1e-3; the config has '
                     f'rpn_min_size={m.rpn_min_size}')
  model = FasterRCNN(
      backbone, num_classes=None, min_size=64, max_size=64, image_mean=[0.0, 0.0, 0.0],
      image_std=[1.0, 1.0, 1.0],
      rpn_anchor_generator=AnchorGenerator((tuple(m.anchor_sizes),), (tuple(m.aspect_ratios),)),
      rpn_head=RPNHead(channels, m.num_anchors),
      rpn_pre_nms_top_n_train=m.rpn_pre_nms_top_n_train,
      rpn_pre_nms_top_n_test=m.rpn_pre_nms_top_n_test,
      rpn_post_nms_top_n_train=m.rpn_post_nms_top_n_train,
      rpn_post_nms_top_n_test=m.rpn_post_nms_top_n_test, rpn_nms_thresh=m.rpn_nms_threshold,
      rpn_fg_iou_thresh=m.rpn_fg_iou_threshold, rpn_bg_iou_thresh=m.rpn_bg_iou_threshold,
      rpn_batch_size_per_image=m.rpn_batch_size_per_image,
      rpn_positive_fraction=m.rpn_positive_fraction, rpn_score_thresh=0.0,
      box_roi_pool=MultiScaleRoIAlign(['0'], m.roi_output_size, m.roi_sampling_ratio),
      box_head=TwoMLPHead(channels * m.roi_output_size ** 2, m.representation_size),
      box_predictor=FastRCNNPredictor(m.representation_size, num_classes + 1),
      box_score_thresh=m.box_score_threshold, box_nms_thresh=m.box_nms_threshold,
      box_detections_per_img=m.detections_per_image, box_fg_iou_thresh=m.box_fg_iou_threshold,
      box_bg_iou_thresh=m.box_bg_iou_threshold,
      box_batch_size_per_image=m.box_batch_size_per_image,
      box_positive_fraction=m.box_positive_fraction,
      bbox_reg_weights=(wx, wy, ww, wh))  # torchvision's order: (x, y, w, h)
  if init == 'cnnlab':
    init_like_cnnlab(model)
  elif init != 'torchvision':
    raise ValueError(f"init must be 'cnnlab' or 'torchvision', got {init!r}")
  return model


def init_like_cnnlab(model) -> None:
  """cnnlab's initial distributions: backbone convs He normal over fan-out (cnnlab.layers'
  ConvBlock), batch norm 1 / 0, the RPN head N(0, 0.01), the MLP head's Dense layers Flax's
  default LeCun truncated normal, the predictor N(0, 0.01) / N(0, 0.001), biases 0."""
  import torch
  import torch.nn as tnn
  with torch.no_grad():
    for layer in model.backbone.modules():
      if isinstance(layer, tnn.Conv2d):
        tnn.init.kaiming_normal_(layer.weight, mode='fan_out', nonlinearity='relu')
        if layer.bias is not None:
          tnn.init.zeros_(layer.bias)
      elif isinstance(layer, tnn.BatchNorm2d):
        tnn.init.ones_(layer.weight)
        tnn.init.zeros_(layer.bias)
    for layer in model.rpn.head.modules():
      if isinstance(layer, tnn.Conv2d):
        tnn.init.normal_(layer.weight, std=0.01)
        tnn.init.zeros_(layer.bias)
    for layer in (model.roi_heads.box_head.fc6, model.roi_heads.box_head.fc7):
      # Flax's lecun_normal: a normal truncated at 2 sigma, scaled to variance 1 / fan_in.
      std = math.sqrt(1.0 / layer.in_features) / 0.87962566103423978
      tnn.init.trunc_normal_(layer.weight, 0.0, std, -2 * std, 2 * std)
      tnn.init.zeros_(layer.bias)
    predictor = model.roi_heads.box_predictor
    tnn.init.normal_(predictor.cls_score.weight, std=0.01)
    tnn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    tnn.init.zeros_(predictor.cls_score.bias)
    tnn.init.zeros_(predictor.bbox_pred.bias)


def count_params(model) -> int:
  return sum(p.numel() for p in model.parameters())


def torch_images(images, mean, std, flips=None, device='cpu'):
  """(B, H, W, C) uint8 numpy -> (B, C, H, W) float32 tensor, (x / 255 - mean) / std as cnnlab's
  step computes it, mirrored left-right where flips (B,) bool."""
  import torch
  x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255.0
  mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
  std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
  x = (x - mean) / std
  if flips is not None:
    x = torch.where(torch.from_numpy(flips).to(device).view(-1, 1, 1, 1), x.flip(-1), x)
  return x.contiguous()


def flip_boxes(boxes, flips):
  """(B, M, 4) (ymin, xmin, ymax, xmax) fractions mirrored left-right where flips (B,), as
  cnnlab.data.augment.flip does (1 - x, in float32)."""
  import numpy as np
  boxes = boxes.astype(np.float32)
  one = np.float32(1.0)
  mirrored = np.stack([boxes[..., 0], one - boxes[..., 3], boxes[..., 2], one - boxes[..., 1]], -1)
  return np.where(flips[:, None, None], mirrored, boxes)


def torch_batch(split: dict, indices, flips, mean, std, device='cpu'):
  """One training batch of `split` (load_split's arrays) for torchvision: (images, targets),
  images (B, C, H, W) normalised and flipped, targets [{'boxes' (n, 4) float32 (x1, y1, x2, y2)
  pixels, 'labels' (n,) int64 in 1..K}] per image. As cnnlab's augmentation does, an object
  whose box is under MIN_BOX_PIXELS high or wide is dropped (a flip drops none)."""
  import numpy as np
  import torch
  from cnnlab.data.augment import MIN_BOX_PIXELS
  images = split['image'][indices]
  height, width = images.shape[1:3]
  x = torch_images(images, mean, std, flips, device)
  boxes = flip_boxes(split['boxes'][indices], flips)
  scale = np.asarray([width, height, width, height], np.float32)
  targets = []
  for b, labels, n in zip(boxes, split['labels'][indices], split['num_objects'][indices]):
    b, labels = b[:n], labels[:n]
    keep = (((b[:, 2] - b[:, 0]) * height >= MIN_BOX_PIXELS)
            & ((b[:, 3] - b[:, 1]) * width >= MIN_BOX_PIXELS))
    xyxy = b[keep][:, [1, 0, 3, 2]] * scale
    targets.append({'boxes': torch.from_numpy(np.ascontiguousarray(xyxy)).to(device),
                    'labels': torch.from_numpy(labels[keep].astype(np.int64) + 1).to(device)})
  return x, targets


def train_step(model, optimizer, scheduler, images, targets) -> dict[str, float]:
  """One step: torchvision's four losses summed, backward, Adam, the schedule; the losses under
  cnnlab's names, and their sum as 'loss'."""
  losses = model(list(images), targets)
  loss = sum(losses.values())
  optimizer.zero_grad(set_to_none=True)
  loss.backward()
  optimizer.step()
  scheduler.step()
  out = {LOSS_NAMES[k]: float(v.detach()) for k, v in losses.items()}
  out['loss'] = float(loss.detach())
  return out


def make_optimizer(model, config, total_steps: int, steps_per_epoch: int):
  """(Adam, LambdaLR) of the config's optimiser and schedule."""
  import torch
  c = config.optim
  optimizer = torch.optim.Adam(model.parameters(), lr=c.learning_rate, betas=(c.b1, c.b2),
                               eps=c.eps, weight_decay=0.0)
  factors = lr_factors(config, total_steps, steps_per_epoch)
  scheduler = torch.optim.lr_scheduler.LambdaLR(
      optimizer, lambda k: factors[min(k, len(factors) - 1)])
  return optimizer, scheduler


def evaluate_torch(model, split: dict, task, mean, std, *, batch_size: int = 32,
                   device='cpu') -> tuple[dict, dict]:
  """The model's detections on `split` in stored order, scored by cnnlab's detection task (its
  accumulate and finalize: cnnlab.tasks.coco_eval): ({AP, AP50, AP75, AR100}, details)."""
  import numpy as np
  import torch
  was_training = model.training
  model.eval()
  images = split['image']
  n, height, width = images.shape[:3]
  slots = model.roi_heads.detections_per_img
  scale = np.asarray([height, width, height, width], np.float32)
  accumulator = task.new_accumulator(tuple(images.shape[1:]))
  with torch.no_grad():
    for start in range(0, n, batch_size):
      rows = slice(start, min(n, start + batch_size))
      outputs = model(list(torch_images(images[rows], mean, std, device=device)))
      b = len(outputs)
      boxes = np.zeros((b, slots, 4), np.float32)
      scores = np.zeros((b, slots), np.float32)
      labels = np.zeros((b, slots), np.int32)
      counts = np.zeros((b,), np.int32)
      for i, out in enumerate(outputs):
        k = len(out['scores'])
        xyxy = out['boxes'].cpu().numpy().astype(np.float32)
        yx = np.clip(xyxy[:, [1, 0, 3, 2]] / scale, 0.0, 1.0)
        boxes[i, :k] = np.concatenate([np.minimum(yx[:, :2], yx[:, 2:]),
                                       np.maximum(yx[:, :2], yx[:, 2:])], -1)
        scores[i, :k] = out['scores'].cpu().numpy()
        labels[i, :k] = out['labels'].cpu().numpy() - 1
        counts[i] = k
      records = {'boxes': boxes, 'scores': scores, 'labels': labels, 'num_detections': counts,
                 'gt_boxes': split['boxes'][rows].astype(np.float32),
                 'gt_labels': split['labels'][rows].astype(np.int32),
                 'num_objects': split['num_objects'][rows].astype(np.int32)}
      accumulator = task.accumulate(accumulator, records)
  metrics, details = task.finalize({'count': n}, accumulator)
  model.train(was_training)
  return {k: float(v) for k, v in metrics.items()}, details


# ---------------------------------------------------------------------------------------------
# Child process: the torch side (prints progress; the result goes to spec['result_path']).

def child_torch(spec: dict) -> dict:
  started = time.perf_counter()
  import numpy as np
  import torch
  device = 'cuda' if spec['device'] == 'gpu' else 'cpu'
  if device == 'cuda' and not torch.cuda.is_available():
    raise RuntimeError(f'--device gpu but this torch ({torch.__version__}) sees no CUDA device')
  if spec['torch_threads']:
    torch.set_num_threads(spec['torch_threads'])
  config = experiment_config(spec['overrides'])
  check_supported(config)
  torch.manual_seed(config.seed)
  train, info = load_split(config, config.data.train_split)
  test, _ = load_split(config, config.data.eval_split)
  mean, std = normalization(config, info)
  num_train, batch = len(train['image']), config.train.batch_size
  total, steps_per_epoch = schedule_steps(config, num_train)
  indices, flips = cnnlab_stream(config, num_train, total)
  task = detection_task(config, info)
  from cnnlab import analysis
  cnnlab_params = analysis.count_params(cnnlab_model(config, info.num_classes), info.image_shape)
  model = build_torch_model(config, info.num_classes, spec['torch_init']).to(device).train()
  num_params = count_params(model)
  if num_params != cnnlab_params:
    raise AssertionError(f"torch twin: {num_params:,} parameters, cnnlab's faster_rcnn has "
                         f'{cnnlab_params:,}')
  optimizer, scheduler = make_optimizer(model, config, total, steps_per_epoch)
  eval_every = config.train.eval_every_steps or steps_per_epoch
  log_every = config.train.log_every_steps
  setup_s = time.perf_counter() - started
  print(f'torch: {num_params:,} parameters (cnnlab {cnnlab_params:,}); {total} steps of {batch} '
        f'on {num_train} images; {torch.get_num_threads()} threads; setup {setup_s:.1f}s',
        flush=True)

  times, records, evals, pending = [], [], [], []
  eval_time = 0.0
  train_started = time.perf_counter()
  interval_step = 0
  for step in range(total):
    t = time.perf_counter()
    images, targets = torch_batch(train, indices[step], flips[step], mean, std, device)
    losses = train_step(model, optimizer, scheduler, images, targets)
    if device == 'cuda':
      torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
    pending.append(losses)
    done = step + 1
    if done % log_every == 0 or done == total:
      record = {k: float(np.mean([p[k] for p in pending])) for k in pending[0]}
      record.update(step=done, images_per_s=(done - interval_step) * batch / sum(
          times[interval_step:done]), learning_rate=optimizer.param_groups[0]['lr'])
      records.append(record)
      print(f"torch step {done}/{total}: loss {record['loss']:.4f}, "
            f"{record['images_per_s']:.1f} images/s", flush=True)
      pending, interval_step = [], done
    if done % eval_every == 0 or done == total:
      t = time.perf_counter()
      metrics, details = evaluate_torch(model, test, task, mean, std, device=device,
                                        batch_size=config.train.eval_batch_size or batch)
      eval_time += time.perf_counter() - t
      evals.append({**metrics, 'step': done, 'coco': details['coco']})
      print(f'torch eval at step {done}: ' + ', '.join(f'{k} {metrics[k]:.4f}' for k in COCO_KEYS)
            + f' ({time.perf_counter() - t:.1f}s)', flush=True)
  loop_s = time.perf_counter() - train_started
  timed = times[1:] or times
  final = evals[-1]
  return {'num_params': num_params, 'cnnlab_num_params': cnnlab_params, 'steps': total,
          'images_seen': total * batch, 'final_eval': {k: final[k] for k in (*COCO_KEYS, 'step')},
          'coco': final['coco'], 'evals': evals, 'train_records': records,
          'images_per_s': batch * len(timed) / sum(timed),
          'images_per_s_all_steps': batch * total / sum(times),
          'first_step_s': times[0], 'step_times_s': times, 'train_time_s': sum(times),
          'eval_time_s': eval_time, 'loop_time_s': loop_s, 'setup_time_s': setup_s,
          'torch_version': torch.__version__, 'torch_threads': torch.get_num_threads(),
          'torch_init': spec['torch_init'], 'backend': device,
          'num_train': num_train, 'num_test': len(test['image']), 'mean': list(mean),
          'std': list(std), 'flipped_fraction': float(flips.mean())}


def child_main(spec_path: str) -> int:
  with open(spec_path, encoding='utf-8') as f:
    spec = json.load(f)
  result = child_torch(spec)
  with open(spec['result_path'], 'w', encoding='utf-8') as f:
    json.dump(result, f)
  return 0


# ---------------------------------------------------------------------------------------------
# The parent: runs the two sides, reads their results, prints the table and writes the JSON.

def stream(command: list[str], env: dict, log_path: str, prefix: str, timeout: float) -> tuple:
  """Runs `command`, its output (stdout and stderr) copied line by line to the console (with
  `prefix`) and to `log_path`: (return code or None on timeout, wall seconds, output tail)."""
  started = time.perf_counter()
  tail: list[str] = []
  with open(log_path, 'w', encoding='utf-8') as log:
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
      for line in proc.stdout:
        log.write(line)
        # The console gets the last state of a progress bar's line, without its escapes.
        shown = ANSI_ESCAPE.sub('', line.rstrip().rsplit('\r', 1)[-1]).strip()
        if shown:
          print(f'  [{prefix}] {shown}', flush=True)
          tail = (tail + [shown])[-20:]
      rc = proc.wait()
    finally:
      timed_out = not timer.is_alive()
      timer.cancel()
  return (None if timed_out and rc != 0 else rc), time.perf_counter() - started, tail


def side_env(peer: str, device: str) -> dict:
  env = bench_train.child_env('cnnlab', device, '')
  if peer == 'torch':  # JAX only draws cnnlab's data stream there: keep it on the CPU
    env['JAX_PLATFORMS'] = 'cpu'
    if device == 'cpu':
      env['CUDA_VISIBLE_DEVICES'] = ''
  return env


def run_cnnlab(overrides: list[str], workdir: str, device: str, timeout: float) -> dict:
  run_dir = os.path.join(workdir, 'cnnlab')
  extra = ["compilation_cache_dir=''"]
  command = [sys.executable, '-m', 'cnnlab.cli', 'train', '--config', EXPERIMENT, '--workdir',
             run_dir, *(f'--config.{o}' for o in [*overrides, *extra])]
  load_before = os.getloadavg()[0]
  rc, wall, tail = stream(command, side_env('cnnlab', device),
                          os.path.join(workdir, 'cnnlab.log'), 'cnnlab', timeout)
  row = {'peer': 'cnnlab', 'command': ' '.join(['python', *command[1:]]), 'wall_s': wall,
         'load_before': load_before, 'load_after': os.getloadavg()[0]}
  summary_path = os.path.join(run_dir, 'summary.json')
  if rc != 0 or not os.path.exists(summary_path):
    why = 'timed out' if rc is None else f'exit {rc}'
    return {**row, 'ok': False, 'error': f'{why}\n' + '\n'.join(tail)}
  with open(summary_path, encoding='utf-8') as f:
    summary = json.load(f)
  evals, train = [], []
  metrics_path = os.path.join(run_dir, 'metrics.jsonl')
  if os.path.exists(metrics_path):
    with open(metrics_path, encoding='utf-8') as f:
      for line in f:
        record = json.loads(line)
        (evals if record.pop('kind') == 'eval' else train).append(record)
  final = summary['final_eval']
  return {**row, 'ok': True, 'num_params': summary['num_params'], 'steps': summary['steps'],
          'final_eval': {k: final[k] for k in (*COCO_KEYS, 'step')}, 'coco': summary.get('coco'),
          'evals': evals, 'train_records': train, 'images_per_s': summary['images_per_sec'],
          'train_time_s': summary['train_time_s'], 'eval_time_s': summary['eval_time_s'],
          'compile_time_s': summary['compile_time_s'], 'setup_time_s': summary['setup_time_s'],
          'run_wall_time_s': summary['wall_time_s'], 'run_dir': run_dir}


def run_torch(overrides: list[str], workdir: str, device: str, timeout: float,
              threads: int, init: str) -> dict:
  spec = {'overrides': overrides, 'device': device, 'torch_threads': threads, 'torch_init': init,
          'result_path': os.path.join(workdir, 'torch_result.json')}
  spec_path = os.path.join(workdir, 'torch_spec.json')
  with open(spec_path, 'w', encoding='utf-8') as f:
    json.dump(spec, f)
  if os.path.exists(spec['result_path']):
    os.remove(spec['result_path'])
  command = [sys.executable, os.path.abspath(__file__), '--child', spec_path]
  load_before = os.getloadavg()[0]
  rc, wall, tail = stream(command, side_env('torch', device), os.path.join(workdir, 'torch.log'),
                          'torch', timeout)
  row = {'peer': 'torch', 'wall_s': wall, 'load_before': load_before,
         'load_after': os.getloadavg()[0]}
  if rc != 0 or not os.path.exists(spec['result_path']):
    why = 'timed out' if rc is None else f'exit {rc}'
    return {**row, 'ok': False, 'error': f'{why}\n' + '\n'.join(tail)}
  with open(spec['result_path'], encoding='utf-8') as f:
    return {**row, 'ok': True, **json.load(f)}


PEER_NAMES = {'cnnlab': 'cnnlab (JAX)', 'torch': 'torchvision FasterRCNN (eager)'}


def markdown_table(rows: list[dict]) -> str:
  lines = ['| peer | parameters | AP50 | AP | AP75 | AR100 | train images/s | train s | eval s '
           '| wall s |', '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    name = PEER_NAMES[r['peer']]
    if not r['ok']:
      last = (r['error'].strip().splitlines() or ['?'])[-1]
      lines.append(f'| {name} | FAILED: {last[:120]} |' + ' |' * 8)
      continue
    e = r['final_eval']
    lines.append(f"| {name} | {r['num_params']:,} | {e['AP50']:.3f} | {e['AP']:.3f} | "
                 f"{e['AP75']:.3f} | {e['AR100']:.3f} | {r['images_per_s']:.1f} | "
                 f"{r['train_time_s']:.0f} | {r['eval_time_s']:.0f} | {r['wall_s']:.0f} |")
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--peers', default=','.join(PEERS), help=f'from {", ".join(PEERS)}')
  parser.add_argument('--epochs', type=float, default=None,
                      help="train.num_epochs of both sides (default: the experiment's, 5)")
  parser.add_argument('--num-train', type=int, default=None,
                      help="data.shapes.num_train (default: the experiment's, 4000)")
  parser.add_argument('--num-test', type=int, default=None,
                      help="data.shapes.num_test (default: the experiment's, 1000)")
  parser.add_argument('--seed', type=int, default=None, help="config seed (default: the "
                      "experiment's, 0): cnnlab's init, order and flips; torch's init and samples")
  parser.add_argument('--workdir', default=None,
                      help='where the cnnlab run, the logs and the torch result go (default: a '
                      'new temporary directory); WORKDIR/cnnlab must not hold a run yet')
  parser.add_argument('--json', default=None, help='also write every figure here')
  parser.add_argument('--torch-threads', type=int, default=0, help='0 = torch default')
  parser.add_argument('--torch-init', choices=('cnnlab', 'torchvision'), default='cnnlab',
                      help="the twin's initial distributions (module docstring)")
  parser.add_argument('--device', choices=('auto', 'cpu', 'gpu'), default='auto')
  parser.add_argument('--timeout', type=float, default=4 * 3600.0, help='seconds per side')
  parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    return child_main(args.child)

  peers = bench_train.split_list(args.peers, PEERS, 'peers')
  if args.num_train is not None and args.num_train < 32:
    raise SystemExit('--num-train must be at least the batch, 32')
  if args.num_test is not None and args.num_test < 1:
    raise SystemExit('--num-test must be >= 1')
  overrides = bench_overrides(epochs=args.epochs, num_train=args.num_train,
                              num_test=args.num_test, seed=args.seed)
  workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix='bench_detect-'))
  os.makedirs(workdir, exist_ok=True)
  run_dir = os.path.join(workdir, 'cnnlab')
  if 'cnnlab' in peers and os.path.isdir(run_dir) and os.listdir(run_dir):
    raise SystemExit(f'{run_dir} holds a run already (cnnlab would resume it): remove it or '
                     'choose another --workdir')
  import importlib.util
  if 'torch' in peers and importlib.util.find_spec('torchvision') is None:
    print('torchvision is not installed: measuring cnnlab only', file=sys.stderr)
    peers = [p for p in peers if p != 'torch']
  device = bench_train.detect_device() if args.device == 'auto' else args.device
  meta = {'command': ' '.join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
          'experiment': EXPERIMENT, 'overrides': overrides, 'workdir': workdir,
          'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'host': platform.node(),
          'cpu_count': os.cpu_count(), 'processor': bench_train.cpu_model(), 'device': device,
          'python': platform.python_version(), 'load_before': list(os.getloadavg())}
  print(f'device: {device}; host cores: {os.cpu_count()}; load average: '
        f'{" ".join(f"{v:.2f}" for v in os.getloadavg())}; workdir {workdir}; overrides: '
        f'{" ".join(overrides) or "none (the shipped experiment)"}', flush=True)
  rows = []
  for peer in peers:
    print(f'{peer} ...', flush=True)
    if peer == 'cnnlab':
      row = run_cnnlab(overrides, workdir, device, args.timeout)
    else:
      row = run_torch(overrides, workdir, device, args.timeout, args.torch_threads,
                      args.torch_init)
    print(f'{peer}: ' + ('done' if row['ok'] else 'FAILED\n' + row['error'])
          + f' ({row["wall_s"]:.0f}s)', flush=True)
    rows.append(row)
  meta['load_after'] = list(os.getloadavg())
  ok = {r['peer']: r for r in rows if r['ok']}
  if len(ok) == 2 and ok['cnnlab']['num_params'] != ok['torch']['num_params']:
    print(f"parameter counts differ: cnnlab {ok['cnnlab']['num_params']:,}, torch "
          f"{ok['torch']['num_params']:,}", file=sys.stderr)
  print()
  print(markdown_table(rows))
  print(f'\nTest split after the last step, scored by cnnlab.tasks.coco_eval on both sides; '
        f'images/s: training steps only (cnnlab: summary.json, compiled ahead; torch: every step '
        f'but the first); wall: the whole subprocess. Load average after: '
        f'{" ".join(f"{v:.2f}" for v in os.getloadavg())}')
  if len(ok) == 2:
    ratio = ok['cnnlab']['images_per_s'] / ok['torch']['images_per_s']
    print(f'cnnlab / torch images/s: {ratio:.2f}')
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump({'meta': meta, 'rows': rows}, f, indent=1)
  return 0 if all(r['ok'] for r in rows) else 1


if __name__ == '__main__':
  sys.exit(main())
