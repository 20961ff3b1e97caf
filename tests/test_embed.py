"""`cnnlab embed` and cnnlab.embed: penultimate and layer features, their 2-D map, the files."""

import functools
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl
from sklearn.decomposition import PCA

from cnnlab import cli, config as config_lib, embed, models
from cnnlab.data import examples
from cnnlab.explain import feature_maps
from cnnlab.inference import load_run
from cnnlab.train import loop

PNG = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module', autouse=True)
def one_thread_for_sklearn():
  """t-SNE's OpenMP threads spin-wait: on two cores shared with other work 30 points take 25 s
  instead of half a second."""
  with threadpoolctl.threadpool_limits(limits=1):
    yield


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory, shared_data_dir):
  """A 2-step run of a tiny batch-norm conv_stack with a hidden dense layer on 8x8 digits, so the
  penultimate features (the hidden layer's 6 outputs) differ from the pooled map (8 channels)."""
  from cnnlab.configs import base
  config = base.get_config()
  for arg in ("task.name='classification'", "model.name='conv_stack'", 'model.filters=(4, 8)',
              'model.hidden=(6,)', "data.name='digits'", f"data.data_dir='{shared_data_dir}'",
              'train.batch_size=16', 'train.eval_batch_size=128', 'train.num_steps=2',
              'train.log_every_steps=1', 'optim.learning_rate=0.05', "log.progress='none'",
              'log.tensorboard=False', "compilation_cache_dir=''"):
    key, _, value = arg.partition('=')
    config_lib.set_value(config, key, config_lib.parse_value(value))
  path = str(tmp_path_factory.mktemp('embed') / 'run')
  loop.train_and_evaluate(config, path)
  return path


@pytest.fixture(scope='module')
def run(run_dir):
  return load_run(run_dir)


@pytest.fixture(scope='module')
def digits(run):
  """The first 40 test digits: image uint8 (40, 8, 8, 1), label (40,)."""
  return examples.first(run.config.data, run.image_shape, 'digits', 'test', 40)


# ---- the library ----

def test_penultimate_is_the_pre_logits_and_the_backbone_output(run, digits):
  # timm's backbone convention: num_classes=0 is the model without its head.
  backbone = run.model.clone(num_classes=0)
  without_head = {**run.variables,
                  'params': {k: v for k, v in run.variables['params'].items() if k != 'head'}}

  @jax.jit  # one compilation for the three forward passes
  def three_ways(variables, x):
    _, state = run.model.apply(variables, x, train=False, mutable=['intermediates'])
    return (embed.penultimate(run.model, variables, x), state['intermediates']['pre_logits'][0],
            backbone.apply(without_head, x, train=False))

  got, sown, pooled = map(np.asarray, three_ways(run.variables,
                                                 run.preprocess(digits['image'][:10])))
  assert got.shape == (10, 6) and got.dtype == np.float32
  np.testing.assert_allclose(got, sown, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got, pooled, rtol=1e-6, atol=1e-6)
  assert np.abs(got).max() > 0  # features, not zeros


def test_features_batch_padded_and_compiled_once(run, digits, monkeypatch):
  images = digits['image'][:13]  # 13 = 5 + 5 + 3: the last batch padded with two images
  traces = []
  penultimate = embed.penultimate
  monkeypatch.setattr(embed, 'penultimate', lambda *a: traces.append(1) or penultimate(*a))
  got = embed.features(run, images, batch_size=5)
  assert len(traces) == 1  # one shape, one trace
  assert got.shape == (13, 6) and got.dtype == np.float32
  one_at_a_time = embed.features(run, images, batch_size=1)  # no padding
  np.testing.assert_allclose(got, one_at_a_time, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('layer', ['stage2', 'fc1'])  # a sown map, a module's (B, D) output
def test_a_named_layer_is_its_feature_maps_averaged_over_space(run, digits, layer):
  images = digits['image'][:7]
  got = embed.features(run, images, layer=layer, batch_size=4)
  maps = np.asarray(jax.jit(lambda v, x: feature_maps(run.model, v, x, layer)[layer])(
      run.variables, run.preprocess(images)))
  want = maps.mean(axis=(1, 2)) if maps.ndim == 4 else maps  # fc1: already (B, D)
  assert got.shape == (7, maps.shape[-1]) == (7, embed.width(run, layer))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_an_unknown_layer_lists_the_layers(run, digits):
  with pytest.raises(ValueError, match=r"no layer 'stage9'(.|\n)*stage2 +\(B, 2, 2, 8\)"):
    embed.features(run, digits['image'][:2], layer='stage9')


class _NoDense(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Conv(3, (3, 3))(x).mean(axis=(1, 2))


def test_a_model_without_a_dense_layer_asks_for_a_layer():
  model, x = _NoDense(), jnp.zeros((2, 8, 8, 1))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  with pytest.raises(ValueError, match='_NoDense calls no dense layer.*--layer'):
    jax.eval_shape(functools.partial(embed.penultimate, model), variables, x)


@pytest.mark.parametrize('name,shape,width,args', [
    ('resnet18', (64, 64, 3), 512, {}),
    ('googlenet', (96, 96, 3), 1024, {'aux_logits': False}),  # (they run only in training)
    ('conv_encoder', (28, 28, 1), None, {})])
def test_penultimate_widths_of_the_zoo(name, shape, width, args):
  """Abstract evaluation only: the width of each model's head input, at no compute."""
  model = models.create_model(name, num_classes=7, **args)
  x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  got = jax.eval_shape(functools.partial(embed.penultimate, model), variables, x)
  if width is None:  # the encoder's code: what its num_classes=0 backbone returns
    width = jax.eval_shape(functools.partial(models.create_model(name, num_classes=0).apply,
                                             train=False), variables, x).shape[-1]
  assert got.shape == (2, width) and got.dtype == jnp.float32


def test_project_pca_and_tsne():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(0, 1, (15, 5)), rng.normal(8, 1, (15, 5))]).astype(np.float32)
  pca = embed.project(x)
  np.testing.assert_allclose(pca, PCA(n_components=2, random_state=0).fit_transform(x),
                             rtol=1e-5, atol=1e-5)
  assert pca.shape == (30, 2) and pca.dtype == np.float32
  tsne = embed.project(x, 'tsne')
  np.testing.assert_array_equal(tsne, embed.project(x, 'tsne'))  # seeded
  assert tsne.shape == (30, 2) and np.isfinite(tsne).all()
  # The two blobs stay apart: every point is nearer its own blob's centre.
  centres = tsne[:15].mean(0), tsne[15:].mean(0)
  assert (np.linalg.norm(tsne[:15] - centres[0], axis=1)
          < np.linalg.norm(tsne[:15] - centres[1], axis=1)).all()
  one = embed.project(x[:, :1])  # a single feature: its map's second axis is zero
  assert one.shape == (30, 2) and not one[:, 1].any()
  with pytest.raises(ValueError, match="one of \\('pca', 'tsne'\\), got 'umap'"):
    embed.project(x, 'umap')
  with pytest.raises(ValueError, match='N >= 2'):
    embed.project(x[:1])


def test_the_scatter_names_the_classes(tmp_path, monkeypatch):
  from cnnlab import runs
  made = []
  figure = runs.figure
  monkeypatch.setattr(runs, 'figure', lambda *a: made.append(figure(*a)) or made[-1])
  points = np.random.default_rng(0).normal(size=(9, 2))
  labels = np.array([0, 1, 2, 0, 1, 2, -1, 0, 1])
  path = embed.scatter(points, labels, str(tmp_path / 'map.png'), ('cat', 'dog', 'emu'))
  legend = [t.get_text() for t in made[0].axes[0].get_legend().get_texts()]
  assert legend == ['unlabelled', 'cat', 'dog', 'emu']
  with open(path, 'rb') as f:
    assert f.read(8) == PNG


# ---- the command ----

def test_the_command_writes_features_labels_and_the_map(run_dir, run, digits, tmp_path, capsys,
                                                        monkeypatch):
  named = []
  scatter = embed.scatter
  monkeypatch.setattr(embed, 'scatter', lambda *a, **k: named.append(a[3]) or scatter(*a, **k))
  out = tmp_path / 'embed' / 'test.npz'  # the dataset: the run's own (digits)
  assert cli.main(['embed', '--run', run_dir, '--limit', '40', '--out', str(out)]) == 0
  assert tuple(named[0]) == tuple('0123456789')
  saved = np.load(out)
  assert set(saved) == {'features', 'labels', 'map', 'layer', 'method'}
  assert saved['features'].shape == (40, 6) and saved['features'].dtype == np.float32
  np.testing.assert_array_equal(saved['labels'], digits['label'])
  np.testing.assert_allclose(saved['features'], embed.features(run, digits['image']),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(saved['map'], PCA(2, random_state=0).fit_transform(saved['features']),
                             rtol=1e-5, atol=1e-5)
  assert saved['map'].dtype == np.float32
  assert str(saved['layer']) == 'penultimate' and str(saved['method']) == 'pca'
  from PIL import Image
  with Image.open(tmp_path / 'embed' / 'test.png') as png:
    pixels = np.asarray(png.convert('RGB'))
  assert pixels.shape == (650, 850, 3)
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # ten classes' dots, a legend, text
  assert 'wrote' in capsys.readouterr().out


def test_the_command_with_a_layer_tsne_and_images(run_dir, digits, tmp_path):
  out = tmp_path / 'stage2.npz'
  assert cli.main(['embed', '--run', run_dir, '--dataset', 'digits', '--layer', 'stage2',
                   '--map', 'tsne', '--limit', '12', '--out', str(out)]) == 0
  saved = np.load(out)
  assert saved['features'].shape == (12, 8) and saved['map'].shape == (12, 2)
  assert str(saved['layer']) == 'stage2' and str(saved['method']) == 'tsne'
  assert os.path.getsize(tmp_path / 'stage2.png') > 10_000
  mine = tmp_path / 'mine.npy'
  np.save(mine, digits['image'][:5])
  assert cli.main(['embed', '--run', run_dir, '--images', str(mine), '--out',
                   str(tmp_path / 'mine')]) == 0  # .npz added, as numpy does
  saved = np.load(tmp_path / 'mine.npz')
  np.testing.assert_array_equal(saved['labels'], [-1] * 5)
  assert saved['features'].shape == (5, 6) and os.path.exists(tmp_path / 'mine.png')


@pytest.mark.parametrize('argv,message', [
    (['--limit', '0'], '--limit must be >= 1, got 0'),
    (['--layer', 'stage9'], r"no layer 'stage9'.*Did you mean"),
    (['--dataset', 'synthetic'], 'synthetic has 3-channel images; the input takes 1'),
    (['--images', 'x.npy', '--dataset', 'digits'], 'not both'),
])
def test_bad_input_is_a_clear_error(run_dir, tmp_path, capsys, argv, message):
  out = tmp_path / 'bad.npz'
  assert cli.main(['embed', '--run', run_dir, '--out', str(out), *argv]) == 2
  err = capsys.readouterr().err
  assert err.startswith('cnnlab embed: error: ')
  assert re.search(message, err), err
  assert not out.exists()


@pytest.mark.parametrize('argv,message', [
    (['--map', 'umap'], "invalid choice: 'umap'"),
    (['--step', 'last'], 'argument --step: expected a step number or "best", got \'last\''),
])
def test_what_the_parser_refuses(run_dir, tmp_path, capsys, argv, message):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['embed', '--run', run_dir, *argv, '--out', str(tmp_path / 'x.npz')])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / 'x.npz').exists()
