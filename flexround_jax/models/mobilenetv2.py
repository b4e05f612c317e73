"""MobileNetV2 for 28x28x1 images (Fashion-MNIST), width scaled down to train on a CPU.

Layout (defaults): 3x3 stem conv (stride ``stem_strides``: 2, so blocks run at 14x14 and 7x7) -> InvertedResidual
blocks given by ``block_specs`` rows
(expansion t, channels c, repeats n, first stride s) -> 1x1 conv to ``head_width`` -> global average pool ->
Dense head. Each InvertedResidual: 1x1 ``expand`` (omitted when t == 1), 3x3 depthwise ``depthwise``
(``nn.Conv(feature_group_count=channels)``, kernel (3, 3, 1, C)), 1x1 linear ``project``; ReLU6 after the first
two; residual when stride 1 and in == out channels.
Naming contract for the quantization engine: blocks are ``InvertedResidual_<k>``; with ``use_bn`` every conv
``<name>`` is followed by BatchNorm ``<name>_bn`` (see ``fold_bn``), without it convs have biases.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from flexround_jax.models import _common

BLOCK_REGEX = r'InvertedResidual_\d+'

# (expansion t, output channels c, repeats n, first stride s), as in Sandler et al. (2018), Table 2, shortened.
DEFAULT_BLOCKS = ((1, 16, 1, 1), (4, 24, 2, 1), (4, 32, 2, 2), (4, 64, 2, 1))


class InvertedResidual(nn.Module):
  """(N, H, W, C_in) -> (N, H/s, W/s, features)."""
  features: int
  expansion: int
  strides: int = 1
  use_bn: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv_bn = _common.ConvBN(self.use_bn, train)
    hidden = x.shape[-1] * self.expansion
    y = x
    if self.expansion != 1:
      y = nn.relu6(conv_bn(y, hidden, (1, 1), 1, 'expand'))
    y = nn.relu6(conv_bn(y, hidden, (3, 3), self.strides, 'depthwise', groups=hidden))
    y = conv_bn(y, self.features, (1, 1), 1, 'project')
    if self.strides == 1 and x.shape[-1] == self.features:
      y = x + y
    return y


class MobileNetV2(nn.Module):
  """(N, 28, 28, 1) images (uint8 or float in [0, 1]) -> (N, num_classes) logits."""
  block_specs: Sequence[tuple[int, int, int, int]] = DEFAULT_BLOCKS
  stem_width: int = 16
  stem_strides: int = 2
  head_width: int = 256
  num_classes: int = 10
  use_bn: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv_bn = _common.ConvBN(self.use_bn, train)
    x = _common.standardize(x)
    x = nn.relu6(conv_bn(x, self.stem_width, (3, 3), self.stem_strides, 'stem'))
    for t, c, n, s in self.block_specs:
      for j in range(n):
        x = InvertedResidual(c, t, strides=s if j == 0 else 1, use_bn=self.use_bn)(x, train=train)
    x = nn.relu6(conv_bn(x, self.head_width, (1, 1), 1, 'head_conv'))
    return nn.Dense(self.num_classes, name='head')(jnp.mean(x, axis=(1, 2)))
