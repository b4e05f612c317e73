"""ResNet with BasicBlocks for 28x28x1 images (Fashion-MNIST): 3x3 conv stem, no max-pool.

Layout (defaults): stem conv 3x3 -> ``stage_sizes[i]`` BasicBlocks with ``widths[i]`` channels per stage, the first
block of each stage after the first halving the resolution (28 -> 14 -> 7), global average pool, Dense head.
Naming contract used by the quantization engine (blocks selected with regexes on module paths):
``BasicBlock_<k>`` (k counts blocks over the whole network), each holding ``conv1``, ``conv2`` and, where the shape
changes, ``shortcut``; with ``use_bn`` every conv ``<name>`` is followed by a BatchNorm ``<name>_bn`` (the
convention ``fold_bn`` relies on), without it every conv has a bias. Kernels: Conv (kh, kw, in, out),
Dense (in, out).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from flexround_jax.models import _common

BLOCK_REGEX = r'BasicBlock_\d+'


class BasicBlock(nn.Module):
  """Two 3x3 convs with an identity (or strided 1x1 conv) shortcut; (N, H, W, C) -> (N, H/s, W/s, features)."""
  features: int
  strides: int = 1
  use_bn: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv_bn = _common.ConvBN(self.use_bn, train)
    y = nn.relu(conv_bn(x, self.features, (3, 3), self.strides, 'conv1'))
    y = conv_bn(y, self.features, (3, 3), 1, 'conv2')
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv_bn(x, self.features, (1, 1), self.strides, 'shortcut')
    return nn.relu(x + y)


class ResNet(nn.Module):
  """(N, 28, 28, 1) images (uint8 or float in [0, 1]) -> (N, num_classes) logits."""
  stage_sizes: Sequence[int] = (1, 1, 1)
  widths: Sequence[int] = (16, 32, 64)
  stem_width: int = 16
  num_classes: int = 10
  use_bn: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _common.standardize(x)
    x = nn.relu(_common.ConvBN(self.use_bn, train)(x, self.stem_width, (3, 3), 1, 'stem'))
    for i, (n, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(n):
        x = BasicBlock(width, strides=2 if i > 0 and j == 0 else 1, use_bn=self.use_bn)(x, train=train)
    return nn.Dense(self.num_classes, name='head')(jnp.mean(x, axis=(1, 2)))
