"""The uniform integer grid the weight quantizers share: straight-through rounding, the inclusive clamp, step sizes
and integer bounds, the initial grid search (min/max, Lp), codes on a learned grid; plus the knob checks and the
Adam-with-cosine-decay schedule of the learned methods. Knows nothing of the reconstruction engine."""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flexround_jax import _layout
from flexround_jax.qtensor import QTensor, code_dtype
from flexround_jax.spec import QuantSpec

LP_NORM_P = 2.4                 # score of the 'mse' grid search (BRECQ / QDrop / FlexRound supplementary code)
MSE_SHRINK_STEPS = 80           # candidate ranges (x_min, x_max) * (1 - 0.01 i), i = 0..79
MIN_SCALE = 1e-8


def round_ste(x):
  """Round half to even in the forward pass, identity in the backward pass (straight-through estimator).

  ``x + (round(x) - x)`` equals ``round(x)`` exactly in float arithmetic: ``round(x) - x`` is exact (|.| <= 0.5 and
  Sterbenz), so the sum is the representable ``round(x)``.
  """
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def clip_inclusive(v, lo, hi):
  """``clip(v, lo, hi)`` with gradient 1 on [lo, hi] (bounds included) and 0 outside, as ``torch.clamp``.

  ``jnp.clip`` passes 0.5 at exactly the bound, where every element that rounds to qmin/qmax sits after round_ste.
  """
  inside = (v >= lo) & (v <= hi)
  return jnp.where(inside, v, jax.lax.stop_gradient(jnp.clip(v, lo, hi)))


def divide(x, divisor):
  """``x / divisor``, computed as a true division.

  XLA's algebraic simplifier rewrites ``x / exp(t)`` as ``x * exp(-t)`` and ``x / broadcast(s)`` as
  ``x * broadcast(1 / s)``; both are an ulp off and move elements across rounding ties. Broadcasting first and
  hiding the divisor behind an optimisation barrier keeps it opaque, so RTN, AdaRound and FlexRound (at init) round
  the same quotients, jitted or not.
  """
  return x / jax.lax.optimization_barrier(jnp.broadcast_to(divisor, jnp.shape(x)))


def step_size(log_s1, spec: QuantSpec):
  """The grid step s1 = exp(log_s1) in ``spec.scale_dtype``'s values, materialised on its own (grid-shaped) so every
  method sees the same bits.

  XLA's CPU exp is not position-independent (a vectorised body and a scalar tail can differ by an ulp), so an
  exp fused into a kernel-shaped loop may not equal the grid-shaped one RTN stored. Computing it once, behind an
  optimisation barrier, makes RTN's stored scale and FlexRound's s1 the same computation.
  """
  return scale_in_dtype(jax.lax.optimization_barrier(jnp.exp(log_s1)), spec)


def scale_in_dtype(scale, spec: QuantSpec):
  """``scale`` (float32) rounded to ``spec.scale_dtype`` (nearest, at least its smallest positive value), returned as
  float32 with a straight-through gradient. ``s + (r - s)`` is exactly ``r``: r and s are within a factor 2, so
  ``r - s`` is exact (Sterbenz) and the sum is the representable r."""
  if spec.scale_dtype == 'float32':
    return scale
  dtype = jnp.dtype(spec.scale_dtype)
  tiny = float(jnp.finfo(dtype).smallest_subnormal)
  rounded = jnp.maximum(scale.astype(dtype), jnp.asarray(tiny, dtype)).astype(jnp.float32)
  return scale + jax.lax.stop_gradient(rounded - scale)


def integer_bounds(zero_point, spec: QuantSpec, n_in: int | None = None):
  """Bounds of the centred integer q = code - zero_point, broadcastable to the kernel (input size ``n_in``)."""
  cmin, cmax = spec.code_range
  zp = _layout.expand(jnp.asarray(zero_point), spec, n_in).astype(jnp.float32)
  return cmin - zp, cmax - zp


def check_kernel(kernel, spec: QuantSpec, name: str = 'kernel', values: bool = False) -> None:
  """Raises ValueError naming ``name`` for anything a quantizer cannot take.

  Static checks (type, dtype, rank, group size) always; with ``values`` also NaN/Inf, when the kernel is concrete
  (``init`` and ``finalize`` ask for it; ``fake_quant``, the hot path, does not).
  """
  if not isinstance(spec, QuantSpec):
    raise ValueError(f'spec must be a flexround_jax.QuantSpec, got {type(spec).__name__}')
  if not hasattr(kernel, 'shape') or not hasattr(kernel, 'dtype'):
    raise ValueError(f'{name} must be an array, got {type(kernel).__name__}')
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(f'{name} must be a floating-point array, got dtype {kernel.dtype}')
  if kernel.ndim < 2:
    raise ValueError(f'{name} must have rank >= 2 (Dense (in, out) or Conv (..., in, out)), got shape {kernel.shape}')
  if values and not isinstance(kernel, jax.core.Tracer) and not np.isfinite(np.asarray(kernel)).all():
    raise ValueError(f'{name} contains NaN or Inf')


def check_rate(value, name: str) -> None:
  """Raises ValueError naming ``name`` unless ``value`` is a finite non-negative number."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
    raise ValueError(f'{name} must be a non-negative number, got {value!r}')


def check_state(kernel, state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], name: str = 'state'):
  """Raises ValueError if ``state`` does not have exactly the ``expected`` keys and shapes for ``kernel``."""
  if not isinstance(state, Mapping):
    raise ValueError(f'{name} must be a dict of arrays, got {type(state).__name__}')
  if set(state) != set(expected):
    raise ValueError(f'{name} keys {sorted(state)} do not match the expected {sorted(expected)} '
                     f'for a kernel of shape {tuple(kernel.shape)}')
  for key, shape in expected.items():
    got = tuple(np.shape(state[key]))
    if got != tuple(shape):
      raise ValueError(f'{name}[{key!r}] has shape {got}, expected {tuple(shape)} '
                       f'for a kernel of shape {tuple(kernel.shape)}')


def _grid_from_range(x_min, x_max, spec: QuantSpec):
  """log(s1) and integer zero point of the grid spanning [min(x_min, 0), max(x_max, 0)]."""
  x_min = jnp.minimum(x_min, 0.0)
  x_max = jnp.maximum(x_max, 0.0)
  cmin, cmax = spec.code_range
  steps = cmax - cmin
  if spec.symmetric:   # steps / 2 steps on each side of 0: [-(s/2), s/2] covers [-max|x|, max|x|]
    scale = jnp.maximum(2.0 * jnp.maximum(-x_min, x_max) / steps, MIN_SCALE)
    zero_point = jnp.zeros_like(scale, dtype=jnp.int32)
  else:
    scale = jnp.maximum((x_max - x_min) / steps, MIN_SCALE)
    zero_point = jnp.clip(-jnp.round(x_min / scale), 0, steps).astype(jnp.int32)
  return jnp.log(scale), zero_point


def _rtn_error(x, log_scale, zero_point, spec: QuantSpec):
  scale = _layout.expand(step_size(log_scale, spec), spec, x.shape[-2])
  lo, hi = integer_bounds(zero_point, spec, x.shape[-2])
  x_hat = scale * jnp.clip(jnp.round(divide(x, scale)), lo, hi)
  return _layout.reduce_to_grid(jnp.abs(x_hat - x) ** LP_NORM_P, spec, jnp.mean)


@functools.partial(jax.jit, static_argnums=1)
def init_grid(kernel, spec: QuantSpec):
  """Initial grid ``(log_s1, zero_point)`` of grid shape (see ``_layout``).

  The canonical step size is ``step_size(log_s1)``: RTN and AdaRound store exactly that value, and FlexRound's
  divisor is ``step_size(log_s1) * exp(log_s2 + log_s3 [+ log_s4])`` with exp(0) = 1, so at initialisation it rounds
  on bit-for-bit the same grid.
  """
  x = kernel.astype(jnp.float32)
  x_min = _layout.reduce_to_grid(x, spec, jnp.min)
  x_max = _layout.reduce_to_grid(x, spec, jnp.max)
  if spec.grid_init == 'minmax':
    return _grid_from_range(x_min, x_max, spec)

  def candidate(i):
    shrink = 1.0 - 0.01 * i
    log_scale, zero_point = _grid_from_range(x_min * shrink, x_max * shrink, spec)
    return log_scale, zero_point, _rtn_error(x, log_scale, zero_point, spec)

  def body(i, best):
    cand = candidate(i)
    better = cand[2] < best[2]  # strict: ties keep the earlier (wider) range, so i = 0 = minmax wins ties
    return tuple(jnp.where(better, c, b) for c, b in zip(cand, best))

  best = jax.lax.fori_loop(1, MSE_SHRINK_STEPS, body, candidate(0))
  return best[0], best[1]


def adam_cosine(iters: int, lr: float, lr_s1: float | None = None):
  """Adam with cosine decay to 0 over ``iters`` (the official FlexRound / LRQ schedule), over a list of per-kernel
  dicts; with ``lr_s1`` the ``log_s1`` entries get their own rate."""
  sched = lambda rate: optax.cosine_decay_schedule(rate, iters, alpha=0.0)
  if lr_s1 is None:
    return optax.adam(sched(lr))
  labels = lambda tr: [{k: ('s1' if k == 'log_s1' else 'rest') for k in st} for st in tr]
  return optax.multi_transform({'s1': optax.adam(sched(lr_s1)), 'rest': optax.adam(sched(lr))}, labels)


def codes_on_learned_grid(q, state, spec: QuantSpec, n_in: int):
  """QTensor of centred integers ``q`` on the grid of a method that learns ``log_s1`` (FlexRound, LRQ): stored codes
  q + zero_point, scale ``step_size(log_s1)``, the fixed zero point."""
  codes = (q + _layout.expand(state['zero_point'], spec, n_in)).astype(code_dtype(spec))
  return QTensor(codes=codes, scale=step_size(jnp.asarray(state['log_s1'], jnp.float32), spec),
                 zero_point=jnp.asarray(state['zero_point'], jnp.int32), spec=spec)

