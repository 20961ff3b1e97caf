"""Every configuration key cnnlab reads, with its unit and default.

Experiment files (`from cnnlab.configs import base`) start from `get_config()`, change values and
add the arguments of their model under `config.model`. When cnnlab loads an experiment, a key that
is not here (outside `config.model`, whose keys the model checks) is an error with a suggestion,
whether a file or the command line set it.
"""

import ml_collections
from ml_collections import config_dict

from cnnlab.data import default_config as data_config
from cnnlab.tasks.config import default_config as task_config


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # one seed for parameters, batch order, augmentation and dropout
  # Compute dtype of activations: 'float32' | 'bfloat16' | 'float16'. Parameters, optimizer state
  # and the loss stay float32; 'float16' adds dynamic loss scaling.
  c.dtype = 'float32'

  c.model = ml_collections.ConfigDict()
  c.model.name = 'conv_stack'  # a registered model (`cnnlab models`)
  c.model.imports = ()  # modules imported first, for models registered outside cnnlab
  # Classes of the classifier; None = the dataset's number of classes (a mismatch is an error).
  c.model.num_classes = config_dict.placeholder(int)
  # Experiments add the model's own arguments here (c.model.filters = (32, 64), ...).

  c.data = data_config()
  c.task = task_config()  # what the model is trained to do: classification, segmentation, ...

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128  # global batch, examples per step over all devices and hosts
  c.train.num_epochs = 10.0  # passes over the train split (fractions allowed)
  c.train.num_steps = 0  # > 0: train this many steps, overriding num_epochs
  c.train.eval_every_steps = 0  # steps between evaluations; 0 = once per epoch
  c.train.log_every_steps = 50  # steps between metric lines (each one a host sync)
  c.train.eval_batch_size = 0  # examples per evaluation batch; 0 = train.batch_size
  c.train.label_smoothing = 0.0  # fraction of the target mass spread over all classes
  c.train.aux_loss_weight = 0.3  # weight of each auxiliary head's loss (GoogLeNet: 0.3)
  # Non-finite loss or gradients: 'halt' raises naming the step range; 'skip' leaves parameters
  # and optimizer state untouched and halts after `max_consecutive_skips` in a row. A non-finite
  # update is never applied.
  c.train.on_nonfinite = 'halt'
  c.train.max_consecutive_skips = 10

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'sgd'  # 'sgd' | 'adam' | 'adamw' | 'lamb'
  c.optim.learning_rate = 0.1  # peak learning rate for the global batch
  # 'constant' | 'cosine' (to end_lr_fraction) | 'piecewise' (x decay_factor at each boundary) |
  # 'onecycle' (cosine up then down) | 'triangular' (linear up then down, as airbench)
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = 0.0  # linear warmup from 0, in epochs (cosine, piecewise, constant)
  c.optim.end_lr_fraction = 0.0  # cosine: final rate as a fraction of the peak
  c.optim.boundaries = (0.5, 0.75)  # piecewise: fractions of training where the rate drops
  c.optim.decay_factor = 0.1  # piecewise: multiplier at each boundary
  c.optim.peak_fraction = 0.3  # onecycle/triangular: fraction of training spent rising
  c.optim.momentum = 0.9  # sgd: heavy-ball momentum (0 = plain SGD)
  c.optim.nesterov = False  # sgd: Nesterov momentum
  c.optim.b1 = 0.9  # adam, adamw, lamb
  c.optim.b2 = 0.999  # adam, adamw, lamb
  c.optim.eps = 1e-8  # adam, adamw, lamb
  # Weight decay on kernels only (norm scales and biases are masked off): coupled L2 for
  # sgd/adam (added to the gradient, as PyTorch's weight_decay), decoupled for adamw/lamb.
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 0.0  # clip gradients to this global L2 norm; 0 = off
  c.optim.ema_decay = 0.0  # > 0: keep an exponential moving average of the parameters (e.g.
  #                          0.999 per step) and evaluate with it
  # Parameters not trained, by path pattern (fnmatch on '/'-joined paths, a module's path covering
  # everything under it: ('encoder',), ('stage1_*', '*/norm/*')): no update, no weight decay, no
  # optimizer state; a batch norm whose parameters are frozen normalises with its running
  # statistics in training and keeps them. A linear probe freezes everything but the head.
  c.optim.freeze = ()
  # (pattern, factor) pairs: matching parameters train with learning_rate x factor (the first
  # matching pattern applies), e.g. (('encoder', 0.1),) to fine-tune a pretrained encoder gently.
  c.optim.lr_multipliers = ()

  # Transfer learning: start from the weights of another run directory (or of converted weights,
  # cnnlab.pretrained.save_converted). Each parameter and batch-norm statistic whose path exists
  # there with the same shape is copied (from its EMA parameters when it kept them); the others
  # keep their fresh initialisation. Both are listed on stderr and in WORKDIR/transfer.json.
  # Applied when the run starts, never on resume (the run's own checkpoint wins).
  c.transfer = ml_collections.ConfigDict()
  c.transfer.init_from = config_dict.placeholder(str)  # a run directory; None = from scratch
  # The source's checkpoint: 'latest' | 'best' (by its checkpoint.best_metric) | a step number.
  c.transfer.init_step = config_dict.FieldReference('latest', field_type=object)
  # Path patterns (as optim.freeze) of tensors initialised afresh even where the source has them
  # with the same shape, e.g. ('head',) for a new classifier on the same classes.
  c.transfer.init_exclude = ()

  c.parallel = ml_collections.ConfigDict()
  # 'jit': one jax.jit over a Mesh, batch sharded on the 'data' axis, state replicated (or FSDP)
  # and donated. 'pmap': replicated state, gradients and batch statistics averaged by lax.pmean.
  c.parallel.strategy = 'jit'
  c.parallel.fsdp = False  # jit only: shard parameters and optimizer state over 'data'
  c.parallel.num_devices = 0  # devices to use; 0 = all (of all processes)
  # CPU backend only: split the host into this many XLA devices (0 = one per core), so data
  # parallelism uses every core: +13% images/s on the quickstart and +27% on ResNet-18 with 2
  # devices on 2 cores (README), because XLA's own threading of convolutions scales poorly.
  # cnnlab gives XLA's CPU pool 2 threads per device (parallel.cpu_pool_threads), without which
  # several devices deadlock in their all-reduces. Opt-in: results then depend on the core count.
  # Applied by `cnnlab train` before JAX starts; ignored if it has started already.
  c.parallel.cpu_devices = 1

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 0  # steps between checkpoints; 0 = only at the end
  c.checkpoint.keep = 2  # most recent checkpoints kept (the best is kept as well)
  # Evaluation metric that picks the best checkpoint; None = the task's headline metric
  # (classification 'accuracy', segmentation 'miou', localization 'localized', reconstruction
  # 'psnr'), also what `cnnlab runs` and `cnnlab report` show.
  c.checkpoint.best_metric = config_dict.placeholder(str)
  # 'max' | 'min'; None = the task's for its headline, 'min' for 'loss'/'mse', else 'max'.
  c.checkpoint.best_mode = config_dict.placeholder(str)
  c.checkpoint.allow_config_change = False  # resume even if structural keys differ from config.json

  c.log = ml_collections.ConfigDict()
  c.log.tensorboard = True  # write TensorBoard event files into the workdir
  c.log.progress = 'auto'  # 'auto' (a bar on a terminal, plain lines otherwise) | 'bar' | 'plain' | 'none'
  # At each evaluation, draw into TensorBoard (needs log.tensorboard) the first convolution's
  # filters and, for a model of class logits, Grad-CAM on the first 8 evaluation images (the same
  # ones every time); a model without class logits gets its filters only. Costs one forward and
  # backward pass of 8 images per evaluation, plus Grad-CAM's compilation at the first
  # (cnnlab.train.images).
  c.log.images = False

  # Persistent XLA compilation cache: a second run of an experiment skips most of its compile time.
  # None = $CNNLAB_COMPILATION_CACHE, else ~/.cache/cnnlab/jax; '' = off.
  c.compilation_cache_dir = config_dict.placeholder(str)
  return c
