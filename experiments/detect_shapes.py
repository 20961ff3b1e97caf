"""Object detection of procedural shapes with Faster R-CNN: up to six shapes of four kinds per
64x64 image, each found as a box and a class, scored by COCO's box AP over the test split.

  cnnlab train --config experiments/detect_shapes.py --workdir runs/detect_shapes
  cnnlab predict --run runs/detect_shapes --dataset shapes --split test --out runs/detect_shapes/predict

Target: test AP50 >= 0.90 within 20 minutes on a 2-core CPU. Measured 2026-12-02 with the first
command above (run by bench/bench_detect.py, the compilation cache off) alone on the idle 2-core
CPU: test AP50 0.940, AP 0.717, AP75 0.855, AR100 0.761 after 5 epochs (625 steps; AP50 0.821 at
step 250, 0.935 at 500), in 408 s of wall time (6.8 min: compile 14 s, training 343 s at 58
images/s, three evaluations 36 s), the dataset already generated (generating its 5000 examples
the first time took another 86 s). The same run beside other jobs (load average 4-9) took
901 s, with the same figures. With 4 epochs: AP50 0.922, AP 0.681, AP75 0.821, AR100 0.739.
"""

import ml_collections

from cnnlab.configs import base


def get_config():
  config = base.get_config()
  config.task.name = 'detection'
  config.model.name = 'faster_rcnn'
  # conv_stack (32, 64, 128) without the last pooling: a 16x16 map at stride 4. Objects of 5 to 23
  # pixels are one to three cells of the default 8x8 map (stride 8), which reached 0.85 AP50 in
  # 10 epochs at a learning rate of 1e-3; this map, at 2e-3 (in an 8-epoch schedule), 0.83 after
  # 2 epochs and 0.95 after 4, for 1.5x the time per step.
  config.model.backbone_args = ml_collections.ConfigDict(dict(pool=('max', 'max', 'none')))
  # The box head costs most of a step at torchvision's sizes (64 RoIs of 7x7x128 into 256
  # units): 32 RoIs of 5x5 into 128 units train ~3x faster.
  config.model.roi_output_size = 5
  config.model.representation_size = 128
  config.model.rpn_post_nms_top_n_train = 64
  config.model.box_batch_size_per_image = 32
  config.data.name = 'shapes'
  shapes = config.data.shapes
  shapes.resolution = 64
  shapes.num_classes = 4
  shapes.max_objects = 6
  shapes.min_objects = 1
  shapes.min_scale = 0.15  # shapes of 10 to 22 pixels across
  shapes.max_scale = 0.35
  shapes.max_overlap = 0.3
  shapes.num_train = 4000
  shapes.num_test = 1000
  config.data.augment.flip = 'random'  # boxes are flipped with their images
  config.train.batch_size = 32
  config.train.num_epochs = 5.0
  config.train.log_every_steps = 25
  config.train.eval_every_steps = 250
  config.optim.name = 'adam'
  config.optim.learning_rate = 2e-3
  config.optim.schedule = 'cosine'
  config.optim.warmup_epochs = 0.5
  config.checkpoint.keep = 1
  return config
