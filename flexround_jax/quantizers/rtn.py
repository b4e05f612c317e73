"""Round-to-nearest (RTN) on a fixed grid: W_hat = s * clamp(round(W / s), -zp, 2^b - 1 - zp).

State: ``scale`` (s, grid shape) and ``zero_point`` (int32, grid shape). Nothing is trainable.
"""

from __future__ import annotations

import jax.numpy as jnp

from flexround_jax import _layout
from flexround_jax.qtensor import QTensor, code_dtype
from flexround_jax.quantizers import grid as grid_lib
from flexround_jax.quantizers.base import Method, ignoring_step
from flexround_jax.spec import QuantSpec

TRAINABLE: tuple[str, ...] = ()


def state_shapes(kernel_shape, spec: QuantSpec) -> dict[str, tuple[int, ...]]:
  grid = _layout.grid_shape(tuple(kernel_shape), spec)
  return {'scale': grid, 'zero_point': grid}


def init(kernel, spec: QuantSpec) -> dict:
  """Grid from ``spec.grid_init``; ``scale`` is FlexRound's initial s1, bit for bit."""
  grid_lib.check_kernel(kernel, spec, values=True)
  log_scale, zero_point = grid_lib.init_grid(kernel, spec)
  return {'scale': grid_lib.step_size(log_scale, spec), 'zero_point': zero_point}


def _codes(kernel, state, spec: QuantSpec, round_fn):
  scale = _layout.expand(state['scale'], spec, kernel.shape[-2])
  lo, hi = grid_lib.integer_bounds(state['zero_point'], spec, kernel.shape[-2])
  return scale, grid_lib.clip_inclusive(round_fn(grid_lib.divide(kernel, scale)), lo, hi)


def fake_quant(kernel, state, spec: QuantSpec):
  """Quantize-dequantize; straight-through gradient to the kernel."""
  grid_lib.check_kernel(kernel, spec)
  grid_lib.check_state(kernel, state, state_shapes(kernel.shape, spec))
  scale, q = _codes(kernel, state, spec, grid_lib.round_ste)
  return (scale * q).astype(kernel.dtype)


def finalize(kernel, state, spec: QuantSpec) -> QTensor:
  grid_lib.check_kernel(kernel, spec, values=True)
  grid_lib.check_state(kernel, state, state_shapes(kernel.shape, spec))
  _, q = _codes(kernel, state, spec, jnp.round)
  codes = (q + _layout.expand(state['zero_point'], spec, kernel.shape[-2])).astype(code_dtype(spec))
  return QTensor(codes=codes, scale=jnp.asarray(state['scale'], jnp.float32),
                 zero_point=jnp.asarray(state['zero_point'], jnp.int32), spec=spec)


def method() -> Method:
  """Round-to-nearest as a Method: nothing is trained."""
  return Method(name='rtn', hparams={}, init=init,
                fake_quant=ignoring_step(fake_quant),
                finalize=finalize)
