"""Where a grid's parameters live relative to a kernel (Flax layouts: output channel on the last axis).

Stored scale / zero-point shapes, all of kernel rank except per-tensor:
  per_tensor  ()
  per_channel (1, ..., 1, out)
  per_group   (1, ..., 1, in // group_size, out)   groups along the input axis (-2)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flexround_jax.spec import QuantSpec


def grid_shape(kernel_shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
  """Shape of s1 / zero point for a kernel of ``kernel_shape``."""
  if spec.granularity == 'per_tensor':
    return ()
  ones = (1,) * (len(kernel_shape) - 2)
  if spec.granularity == 'per_channel':
    return ones + (1, kernel_shape[-1])
  return ones + (kernel_shape[-2] // spec.group_size, kernel_shape[-1])


def expand(grid_param, spec: QuantSpec):
  """Broadcastable-to-kernel form of a grid parameter (repeats per-group entries along the input axis)."""
  if spec.granularity == 'per_group':
    xp = jnp if isinstance(grid_param, jax.Array) else np
    return xp.repeat(grid_param, spec.group_size, axis=-2)
  return grid_param


def reduce_to_grid(x, spec: QuantSpec, reducer):
  """Reduces a kernel-shaped array to grid shape with ``reducer(x, axis=..., keepdims=True)``."""
  if spec.granularity == 'per_tensor':
    return reducer(x, axis=None, keepdims=False)
  if spec.granularity == 'per_channel':
    return reducer(x, axis=tuple(range(x.ndim - 1)), keepdims=True)
  *lead, n_in, n_out = x.shape
  grouped = x.reshape(*lead, n_in // spec.group_size, spec.group_size, n_out)
  axes = tuple(range(len(lead))) + (len(lead) + 1,)
  return reducer(grouped, axis=axes, keepdims=True).reshape(grid_shape(x.shape, spec))
