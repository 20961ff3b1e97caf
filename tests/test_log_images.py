"""log.images: a training run draws its first convolution's filters and Grad-CAM on fixed
evaluation images into its TensorBoard events at each evaluation, read back here from the event
files themselves (TFRecord framing around tensorboardX's Event protos; TensorBoard itself is not
installed) and checked against the run's own checkpoint."""

import glob
import io
import os
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

import cnnlab
from cnnlab import config as config_lib
from cnnlab.configs import base
from cnnlab.data import examples
from cnnlab.explain import cam, figures, probe
from cnnlab.layers import as_logits
from cnnlab.models import registry
from cnnlab.train import images as images_lib, loop
from cnnlab.workdir import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, 'experiments', 'quickstart.py')
FILTERS, GRAD_CAM = images_lib.FILTERS_TAG, images_lib.GRAD_CAM_TAG


RUN = dict(data__name='digits', data__augment__rotate=0.0, data__augment__scale=0.0,
           train__batch_size=32, train__num_steps=4, train__log_every_steps=2,
           train__eval_every_steps=2, optim__learning_rate=0.1, optim__schedule='constant',
           parallel__num_devices=2, log__progress='none', log__images=True,
           compilation_cache_dir='')


def configure(config, data_dir, **overrides):
  for key, value in {**RUN, 'data__data_dir': data_dir, **overrides}.items():
    config_lib.set_value(config, key.replace('__', '.'), value)
  return config


def tiny(data_dir, **overrides):
  """The quickstart's conv_stack at (8, 16) filters on the 8x8 digits, 4 steps with an evaluation
  every 2, under pmap on 2 devices (so the images are drawn from replicated variables)."""
  model = dict(model__filters=(8, 16), model__kernel_size=3, model__stride=1, model__pool='max',
               parallel__strategy='pmap')
  return configure(config_lib.load(QUICKSTART), data_dir, **{**model, **overrides})


def events(workdir):
  """[(step, tag, summary value)] of every event file under WORKDIR/tensorboard, in order. Each
  record is: length (uint64), its masked CRC (uint32), an Event proto, the data's CRC (uint32)."""
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))):
    data, pos = open(path, 'rb').read(), 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      out += [(event.step, value.tag, value) for value in event.summary.value]
  return out


def images_of(workdir, tag) -> dict[int, np.ndarray]:
  """{step: the decoded uint8 (H, W, 3) image} of `tag`."""
  out = {}
  for step, name, value in events(workdir):
    if name == tag:
      assert value.HasField('image')
      out[step] = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
  return out


def eval_steps(workdir):
  return [r['step'] for r in read_metrics(workdir) if r['kind'] == 'eval']


def blocks(x: np.ndarray, s: int) -> np.ndarray:
  """Each value of (h, w[, 3]) as an s x s block, as the mosaics enlarge."""
  x = x if x.ndim == 3 else x[..., None]
  return np.kron(x, np.ones((s, s, 1)))


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory, shared_data_dir):
  workdir = str(tmp_path_factory.mktemp('log_images'))
  loop.train_and_evaluate(tiny(shared_data_dir), workdir)
  return workdir


def test_each_evaluation_writes_the_filters_and_grad_cam(run_dir):
  assert eval_steps(run_dir) == [2, 4]
  tags = {(step, tag) for step, tag, value in events(run_dir) if value.HasField('image')}
  assert tags == {(step, tag) for step in (2, 4) for tag in (FILTERS, GRAD_CAM)}


def test_the_filters_image_is_the_first_convolutions_kernel_at_that_step(run_dir):
  params = cnnlab.load_run(run_dir).variables['params']  # the last checkpoint: step 4
  kernel = np.asarray(params['stage1_conv1']['conv']['kernel'])
  assert kernel.shape == (3, 3, 1, 8)
  s = 8  # ceil(24 / 3): each weight an 8x8 block
  pictures = images_of(run_dir, FILTERS)
  # 1 row of 8 tiles of 24 pixels, with 1-pixel lines around them
  assert pictures[4].shape == (1 + 1 * (3 * s + 1), 1 + 8 * (3 * s + 1), 3)
  for k in range(8):
    w = kernel[..., k].mean(-1)
    expected = blocks(np.round((w - w.min()) / (w.max() - w.min()) * 255), s)
    tile = pictures[4][1:1 + 3 * s, 1 + k * (3 * s + 1):(k + 1) * (3 * s + 1)]
    np.testing.assert_allclose(tile, np.repeat(expected, 3, -1), atol=1)
  assert not np.array_equal(pictures[2], pictures[4])  # drawn from each evaluation's weights


def test_grad_cam_is_of_the_true_class_on_the_same_images_and_moves_as_it_learns(run_dir,
                                                                                  shared_data_dir):
  run = cnnlab.load_run(run_dir)  # the last checkpoint: step 4, the last evaluation
  first = examples.first(run.config.data, run.image_shape, 'digits', 'test', 8)
  x = run.preprocess(first['image'])
  _, _, info = probe.check(run.model, run.variables, x)
  expected = np.asarray(cam.grad_cam(run.model, run.variables, x, first['label'],
                                     layer=cam.default_layer(info)).upsampled)
  predicted = np.asarray(probe.logits(run.model, run.variables, x)).argmax(-1)
  panels = images_of(run_dir, GRAD_CAM)
  s = 12  # ceil(96 / 8)
  h, w = 8 * s + 4, 2 * 8 * s + 6  # an example's tile, its frame included
  assert panels[4].shape == (2 + 2 * (h + 2), 2 + 4 * (w + 2), 3)  # 8 examples in rows of 4
  moved = 0
  for k in range(8):
    top, left = 2 + (k // 4) * (h + 2), 2 + (k % 4) * (w + 2)
    tile = {step: panel[top:top + h, left:left + w].astype(np.float64)
            for step, panel in panels.items()}
    gray = first['image'][k, ..., 0] / 255.0
    picture = tile[4][2:-2, 2:2 + 8 * s]
    np.testing.assert_allclose(picture, np.repeat(blocks(gray * 255, s), 3, -1), atol=1)
    np.testing.assert_array_equal(tile[2][2:-2, 2:2 + 8 * s], picture)  # the same image each time
    heat = tile[4][2:-2, 8 * s + 4:-2]
    want = blocks(figures.overlay(gray, expected[k], signed=False) * 255, s)
    assert np.mean(np.abs(heat - want)) < 1.0, k  # colormap bins aside, the same map
    frame = figures.FRAME[bool(predicted[k] == first['label'][k])]
    np.testing.assert_allclose(tile[4][0, 0], np.round(np.asarray(frame) * 255))
    moved += np.mean(np.abs(tile[4][2:-2, 8 * s + 4:-2] - tile[2][2:-2, 8 * s + 4:-2])) > 1.0
  assert moved >= 4, f'only {moved} of 8 heat maps changed between the evaluations'


def test_without_log_images_no_image_is_written(tmp_path, shared_data_dir):
  loop.train_and_evaluate(tiny(shared_data_dir, log__images=False), str(tmp_path))
  written = events(str(tmp_path))
  assert {(step, tag) for step, tag, _ in written if tag.startswith('eval/')} >= {
      (2, 'eval/accuracy'), (4, 'eval/accuracy')}
  assert not [tag for _, tag, value in written if value.HasField('image')]


class TinyAE(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return as_logits(nn.Conv(x.shape[-1], (3, 3))(nn.relu(nn.Conv(4, (3, 3))(x))))


def test_a_model_without_class_logits_gets_its_filters_only_and_says_why(tmp_path, shared_data_dir,
                                                                          capsys):
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(registry, '_REGISTRY', dict(registry._REGISTRY))
    registry.register('tiny_ae', input_shape=(8, 8, 1), task='reconstruction')(TinyAE)
    config = configure(base.get_config(), shared_data_dir, model__name='tiny_ae',
                       task__name='reconstruction')  # under jit
    loop.train_and_evaluate(config, str(tmp_path))
  err = capsys.readouterr().err
  assert ("log.images: the filters of 'Conv_1' only; no Grad-CAM: TinyAE returns (1, 8, 8, 1); "
          'attribution methods explain class logits') in err
  tags = {(step, tag) for step, tag, value in events(str(tmp_path)) if value.HasField('image')}
  assert tags == {(2, FILTERS), (4, FILTERS)}
  # Conv_1 (4 filters of 3x3) is called first: Conv_0, built first, is the outer call
  assert images_of(str(tmp_path), FILTERS)[4].shape == (26, 1 + 4 * 25, 3)


def test_the_first_convolution_is_the_first_called_not_the_first_by_name():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Conv(4, (5, 5), name='stem')(x)  # 'stage1' sorts before 'stem'
      x = nn.Conv(4, (3, 3), name='stage1')(x)
      return nn.Dense(3)(x.mean((1, 2)))

  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      return nn.Dense(3)(x.reshape((x.shape[0], -1)))

  def shapes(model):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  assert images_lib.first_convolution(Net(), shapes(Net()), (8, 8, 3)) == 'stem'
  assert images_lib.first_convolution(Mlp(), shapes(Mlp()), (8, 8, 3)) is None


def test_log_images_needs_tensorboard(shared_data_dir):
  config = tiny(shared_data_dir, log__tensorboard=False)
  with pytest.raises(config_lib.ConfigError, match='log.images=True .* needs log.tensorboard=True'):
    config_lib.validate(config)
