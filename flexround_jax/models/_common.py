"""Pieces shared by the image models: input standardisation and the conv(+BatchNorm) naming convention."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

# Fashion-MNIST training-set pixel statistics (on [0, 1]).
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530
BN_SUFFIX = '_bn'


def standardize(x):
  """uint8 images in [0, 255] or floats in [0, 1] -> float32 with roughly zero mean, unit variance."""
  if jnp.issubdtype(x.dtype, jnp.integer):
    x = x.astype(jnp.float32) / 255.0
  return (x.astype(jnp.float32) - PIXEL_MEAN) / PIXEL_STD


def depthwise_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                                   dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """Drop-in for ``lax.conv_general_dilated`` for depthwise NHWC convs (kernel (kh, kw, 1, C)).

  Sums kh * kw shifted, strided slices times per-channel weights: the same numbers as the grouped conv, but XLA on
  CPU runs the grouped conv's backward pass about ten times slower than these elementwise ops.
  """
  del dimension_numbers, kwargs  # Flax's NHWC / HWIO defaults.
  kh, kw, in_per_group, out = rhs.shape
  if in_per_group != 1 or feature_group_count != lhs.shape[-1] or out != lhs.shape[-1] or any(
      d not in (None, 1) and tuple(d) != (1, 1) for d in (lhs_dilation, rhs_dilation)):
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        ('NHWC', 'HWIO', 'NHWC'), feature_group_count, precision=precision)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding)
  (pt, pb), (pl, pr) = padding
  sh, sw = window_strides
  x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  y = 0.0
  for i in range(kh):
    for j in range(kw):
      y = y + x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] * rhs[i, j, 0]
  return y


@dataclasses.dataclass(frozen=True)
class ConvBN:
  """Builds conv ``name`` followed by BatchNorm ``name + '_bn'`` (use_bn) or a conv with bias (BN-free form).

  Called inside a compact ``__call__``; the modules are created in the caller's scope.
  """
  use_bn: bool
  train: bool

  def __call__(self, x, features, kernel_size, strides=1, name='conv', groups=1):
    extra = {'conv_general_dilated': depthwise_conv_general_dilated} if groups > 1 else {}
    x = nn.Conv(features, kernel_size, strides=strides, padding='SAME', feature_group_count=groups,
                use_bias=not self.use_bn, name=name, **extra)(x)
    if self.use_bn:
      x = nn.BatchNorm(use_running_average=not self.train, momentum=0.9, epsilon=1e-5, name=name + BN_SUFFIX)(x)
    return x
