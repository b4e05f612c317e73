"""Where a grid's parameters live relative to a kernel (Flax layouts: output channel on the last axis).

Stored scale / zero-point shapes, all of kernel rank except per-tensor:
  per_tensor  ()
  per_channel (1, ..., 1, out)
  per_group   (1, ..., 1, ceil(in / group_size), out)   groups along the input axis (-2); when group_size does
              not divide ``in`` the last group is shorter (576 inputs in groups of 128: 4 x 128 + 64, as GPTQ's
              ``g_idx = i // group_size``)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flexround_jax.spec import QuantSpec


def n_groups(n_in: int, group_size: int) -> int:
  """Groups along an input axis of ``n_in``: ceil(n_in / group_size), the last one possibly shorter."""
  return -(-n_in // group_size)


def grid_shape(kernel_shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
  """Shape of s1 / zero point for a kernel of ``kernel_shape``."""
  if spec.granularity == 'per_tensor':
    return ()
  ones = (1,) * (len(kernel_shape) - 2)
  if spec.granularity == 'per_channel':
    return ones + (1, kernel_shape[-1])
  return ones + (n_groups(kernel_shape[-2], spec.group_size), kernel_shape[-1])


def expand(grid_param, spec: QuantSpec, n_in: int):
  """Broadcastable-to-kernel form of a grid parameter (repeats per-group entries along the input axis).

  ``n_in`` is the kernel's input size (axis -2): it is checked against the grid, and it cuts the repeated last
  group when that group is shorter.
  """
  if spec.granularity != 'per_group':
    return grid_param
  groups = grid_param.shape[-2]
  if groups != n_groups(n_in, spec.group_size):
    raise ValueError(f'per-group grid with {groups} groups does not fit an input axis of {n_in} '
                     f'(group_size={spec.group_size})')
  xp = jnp if isinstance(grid_param, jax.Array) else np
  return xp.repeat(grid_param, spec.group_size, axis=-2)[..., :n_in, :]


def reduce_to_grid(x, spec: QuantSpec, reducer):
  """Reduces a kernel-shaped array to grid shape with ``reducer(x, axis=..., keepdims=True)``."""
  if spec.granularity == 'per_tensor':
    return reducer(x, axis=None, keepdims=False)
  if spec.granularity == 'per_channel':
    return reducer(x, axis=tuple(range(x.ndim - 1)), keepdims=True)
  *lead, n_in, n_out = x.shape
  g = spec.group_size
  n_full = n_in // g
  axes = tuple(range(len(lead))) + (len(lead) + 1,)
  xp = jnp if isinstance(x, jax.Array) else np
  parts = []
  if n_full:
    grouped = x[..., :n_full * g, :].reshape(*lead, n_full, g, n_out)
    parts.append(reducer(grouped, axis=axes, keepdims=True).reshape((1,) * len(lead) + (n_full, n_out)))
  if n_in % g:   # the shorter last group
    tail = x[..., n_full * g:, :]
    parts.append(reducer(tail, axis=tuple(range(x.ndim - 1)), keepdims=True))
  out = parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=-2)
  return out.reshape(grid_shape(x.shape, spec))


def to_view(w, view_shape: tuple[int, ...], axes: tuple[int, ...] | None):
  """The quantizer's view of a weight: ``w`` reshaped to ``view_shape`` (Dense (in, out), DenseGeneral, Conv), or,
  with ``axes`` (a weight declared by ``WeightParam``), ``transpose(w, axes)`` reshaped: its input axes first."""
  xp = jnp if isinstance(w, jax.Array) else np
  return xp.reshape(w if axes is None else xp.transpose(w, axes), view_shape)


def from_view(v, shape: tuple[int, ...], axes: tuple[int, ...] | None):
  """Inverse of ``to_view``: the weight of ``shape`` whose view is ``v``."""
  xp = jnp if isinstance(v, jax.Array) else np
  if axes is None:
    return xp.reshape(v, shape)
  return xp.transpose(xp.reshape(v, [shape[a] for a in axes]), np.argsort(axes))
