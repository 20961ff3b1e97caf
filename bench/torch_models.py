"""PyTorch twins of the architectures `bench/bench_train.py` measures (NCHW modules).

Each twin has exactly the parameters of cnnlab's model (tests/test_bench.py checks the counts) and
torchvision's structure, so its state dict would load torchvision weights: ResNet v1.5 (stride on
the 3x3 of the bottleneck, 1x1 projection shortcuts), GoogLeNet with BasicConv2d (conv without
bias + BatchNorm eps 1e-3) and a 3x3 "5x5" branch. Batch norm as cnnlab's: momentum 0.1 (cnnlab
keeps 0.9 of the running value, which is PyTorch's 0.1 of the new one), eps 1e-5 (GoogLeNet 1e-3).
torchvision itself is not a dependency.

  create('resnet18', num_classes=10, stem='cifar')   # 11,173,962 parameters
  create('resnet50')                                  # 25,557,032
  create('googlenet', aux_logits=False)               # 6,624,904
  create('simple_cnn', in_channels=1, input_size=28)  # 6,872
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

BN_MOMENTUM = 0.1
BN_EPS = 1e-5
GOOGLENET_BN_EPS = 1e-3


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


# ---- simple_cnn ----

class SimpleCNN(nn.Module):
  """cnnlab's simple_cnn: conv 5x5 x5 -> max-pool 2 -> conv 5x5 x10 -> max-pool 2 -> dense 32 -> dense.

  VALID convolutions with biases (no normalisation), so the flattened width depends on the input
  size: (((s - 4) // 2 - 4) // 2)^2 * 10.
  """

  def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
               features=(5, 10), kernel_size: int = 5, hidden: int = 32):
    super().__init__()
    layers, channels, size = [], in_channels, input_size
    for f in features:
      layers += [nn.Conv2d(channels, f, kernel_size), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
      channels, size = f, (size - kernel_size + 1) // 2
    self.features = nn.Sequential(*layers)
    self.fc1 = nn.Linear(channels * size * size, hidden)
    self.head = nn.Linear(hidden, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
    x = torch.flatten(self.features(x), 1)
    return self.head(torch.relu(self.fc1(x)))


# ---- ResNet (torchvision's, plus cnnlab's CIFAR stem) ----

def _bn(channels: int, zero_init: bool = False) -> nn.BatchNorm2d:
  bn = nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
  if zero_init:
    nn.init.zeros_(bn.weight)
  return bn


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin: int, features: int, stride: int = 1, zero_init_last: bool = False):
    super().__init__()
    self.conv1, self.bn1 = _conv(cin, features, 3, stride), _bn(features)
    self.conv2, self.bn2 = _conv(features, features, 3), _bn(features, zero_init_last)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or cin != features:
      self.downsample = nn.Sequential(_conv(cin, features, 1, stride), _bn(features))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(y)) + identity)


class Bottleneck(nn.Module):
  """v1.5: 1x1 reduce, 3x3 carrying the stride, 1x1 expand by 4."""
  expansion = 4

  def __init__(self, cin: int, features: int, stride: int = 1, zero_init_last: bool = False):
    super().__init__()
    out = features * self.expansion
    self.conv1, self.bn1 = _conv(cin, features, 1), _bn(features)
    self.conv2, self.bn2 = _conv(features, features, 3, stride), _bn(features)
    self.conv3, self.bn3 = _conv(features, out, 1), _bn(out, zero_init_last)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or cin != out:
      self.downsample = nn.Sequential(_conv(cin, out, 1, stride), _bn(out))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    return self.relu(self.bn3(self.conv3(y)) + identity)


class ResNet(nn.Module):
  """stem 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'cifar' (3x3/1 conv, no pool)."""

  def __init__(self, block, stage_sizes, num_classes: int = 1000, stem: str = 'imagenet',
               widths=(64, 128, 256, 512), in_channels: int = 3, zero_init_last: bool = False):
    super().__init__()
    if stem not in ('imagenet', 'cifar'):
      raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
    width = widths[0]
    if stem == 'imagenet':
      self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
    else:
      self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
      self.maxpool = nn.Identity()
    self.bn1, self.relu = _bn(width), nn.ReLU(inplace=True)
    cin = width
    for i, (depth, features) in enumerate(zip(stage_sizes, widths), start=1):
      blocks = []
      for j in range(depth):
        blocks.append(block(cin, features, 2 if i > 1 and j == 0 else 1, zero_init_last))
        cin = features * block.expansion
      setattr(self, f'layer{i}', nn.Sequential(*blocks))
    self.num_stages = len(stage_sizes)
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(cin, num_classes)
    for m in self.modules():  # torchvision's initialisation (cnnlab's he_normal_fan_out)
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for i in range(1, self.num_stages + 1):
      x = getattr(self, f'layer{i}')(x)
    return self.fc(torch.flatten(self.avgpool(x), 1))


# ---- GoogLeNet (torchvision's googlenet) ----

class BasicConv2d(nn.Module):
  def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=GOOGLENET_BN_EPS, momentum=BN_MOMENTUM)

  def forward(self, x):
    return torch.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
  def __init__(self, cin, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj, branch3_kernel=3):
    super().__init__()
    self.branch1 = BasicConv2d(cin, ch1x1, 1)
    self.branch2 = nn.Sequential(BasicConv2d(cin, ch3x3red, 1),
                                 BasicConv2d(ch3x3red, ch3x3, 3, padding=1))
    self.branch3 = nn.Sequential(BasicConv2d(cin, ch5x5red, 1),
                                 BasicConv2d(ch5x5red, ch5x5, branch3_kernel,
                                             padding=branch3_kernel // 2))
    self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True),
                                 BasicConv2d(cin, pool_proj, 1))

  def forward(self, x):
    return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
  def __init__(self, cin: int, num_classes: int, dropout: float = 0.7):
    super().__init__()
    self.pool = nn.AdaptiveAvgPool2d(4)
    self.conv = BasicConv2d(cin, 128, 1)
    self.fc1, self.fc2 = nn.Linear(2048, 1024), nn.Linear(1024, num_classes)
    self.dropout = nn.Dropout(dropout)

  def forward(self, x):
    x = torch.flatten(self.conv(self.pool(x)), 1)
    return self.fc2(self.dropout(torch.relu(self.fc1(x))))


# (name, (ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj)) as cnnlab.models.inception._LAYOUT
_GOOGLENET = (
    ('inception3a', (64, 96, 128, 16, 32, 32)), ('inception3b', (128, 128, 192, 32, 96, 64)),
    ('maxpool3', 3),
    ('inception4a', (192, 96, 208, 16, 48, 64)), ('aux1', None),
    ('inception4b', (160, 112, 224, 24, 64, 64)), ('inception4c', (128, 128, 256, 24, 64, 64)),
    ('inception4d', (112, 144, 288, 32, 64, 64)), ('aux2', None),
    ('inception4e', (256, 160, 320, 32, 128, 128)),
    ('maxpool4', 2),
    ('inception5a', (256, 160, 320, 32, 128, 128)), ('inception5b', (384, 192, 384, 48, 128, 128)),
)


class GoogLeNet(nn.Module):
  """Inception v1 with batch norm. aux_logits: in training, forward returns (logits, aux1, aux2)."""

  def __init__(self, num_classes: int = 1000, aux_logits: bool = True, dropout: float = 0.2,
               aux_dropout: float = 0.7, branch3_kernel: int = 3, in_channels: int = 3):
    super().__init__()
    self.aux_logits = aux_logits
    self.conv1 = BasicConv2d(in_channels, 64, 7, 2, 3)
    self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
    self.conv2 = BasicConv2d(64, 64, 1)
    self.conv3 = BasicConv2d(64, 192, 3, padding=1)
    self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
    self.order, cin = [], 192
    for name, arg in _GOOGLENET:
      if name.startswith('inception'):
        setattr(self, name, Inception(cin, *arg, branch3_kernel=branch3_kernel))
        cin = arg[0] + arg[2] + arg[4] + arg[5]
      elif name.startswith('maxpool'):
        setattr(self, name, nn.MaxPool2d(arg, 2, ceil_mode=True))
      elif aux_logits:
        setattr(self, name, InceptionAux(cin, num_classes, aux_dropout))
      else:
        continue
      self.order.append(name)
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.dropout = nn.Dropout(dropout)
    self.fc = nn.Linear(1024, num_classes)

  def forward(self, x):
    x = self.maxpool1(self.conv1(x))
    x = self.maxpool2(self.conv3(self.conv2(x)))
    aux = []
    for name in self.order:
      if name.startswith('aux'):
        if self.training:
          aux.append(getattr(self, name)(x))
      else:
        x = getattr(self, name)(x)
    logits = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
    return (logits, *aux) if aux else logits


# ---- registry ----

_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    'simple_cnn': SimpleCNN,
    'resnet18': lambda **kw: ResNet(BasicBlock, (2, 2, 2, 2), **kw),
    'resnet34': lambda **kw: ResNet(BasicBlock, (3, 4, 6, 3), **kw),
    'resnet50': lambda **kw: ResNet(Bottleneck, (3, 4, 6, 3), **kw),
    'resnet101': lambda **kw: ResNet(Bottleneck, (3, 4, 23, 3), **kw),
    'googlenet': GoogLeNet,
}


def create(name: str, **kwargs) -> nn.Module:
  """The twin of cnnlab's registered model `name`, with the same keyword arguments."""
  if name not in _FACTORIES:
    raise ValueError(f'no torch twin for {name!r}; have {sorted(_FACTORIES)}')
  return _FACTORIES[name](**kwargs)
