"""AdaRound (Nagel et al., ICML 2020) as in BRECQ/QDrop: learn up-or-down rounding on a fixed grid.

  soft:  W_tilde = s * clamp(floor(W / s) + h(V), -zp, 2^b - 1 - zp),
         h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)
  hard:  W_hat   = s * clamp(floor(W / s) + [V >= 0], -zp, 2^b - 1 - zp)

zeta = 1.1, gamma = -0.1. V starts where h(V) = frac(W / s), so the soft kernel starts at W itself (not at RTN).
The step s is fixed (from the grid search); only ``v`` is trained, with ``regularizer`` pushing h(V) to {0, 1}.

State: ``v`` (kernel shape), ``scale`` (grid shape), ``zero_point`` (int32, grid shape).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flexround_jax import _layout
from flexround_jax.qtensor import QTensor, code_dtype
from flexround_jax.quantizers import grid as grid_lib
from flexround_jax.quantizers.base import Method, ignoring_step
from flexround_jax.spec import QuantSpec

ZETA, GAMMA = 1.1, -0.1
TRAINABLE: tuple[str, ...] = ('v',)


def state_shapes(kernel_shape, spec: QuantSpec) -> dict[str, tuple[int, ...]]:
  grid = _layout.grid_shape(tuple(kernel_shape), spec)
  return {'v': tuple(kernel_shape), 'scale': grid, 'zero_point': grid}


def rectified_sigmoid(v):
  """h(V) in [0, 1]."""
  return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init(kernel, spec: QuantSpec) -> dict:
  grid_lib.check_kernel(kernel, spec, values=True)
  log_scale, zero_point = grid_lib.init_grid(kernel, spec)
  scale = grid_lib.step_size(log_scale, spec)
  x = grid_lib.divide(kernel.astype(jnp.float32), _layout.expand(scale, spec, kernel.shape[-2]))
  frac = x - jnp.floor(x)
  v = -jnp.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)
  return {'v': v, 'scale': scale, 'zero_point': zero_point}


def _floor(kernel, state, spec: QuantSpec):
  scale = _layout.expand(state['scale'], spec, kernel.shape[-2])
  return scale, jnp.floor(grid_lib.divide(kernel, scale))


def fake_quant(kernel, state, spec: QuantSpec, hard: bool = False):
  """Soft (``hard=False``, differentiable w.r.t. ``v``) or hard rounding."""
  grid_lib.check_kernel(kernel, spec)
  grid_lib.check_state(kernel, state, state_shapes(kernel.shape, spec))
  scale, floor = _floor(kernel, state, spec)
  up = (state['v'] >= 0).astype(floor.dtype) if hard else rectified_sigmoid(state['v'])
  lo, hi = grid_lib.integer_bounds(state['zero_point'], spec, kernel.shape[-2])
  return (scale * grid_lib.clip_inclusive(floor + up, lo, hi)).astype(kernel.dtype)


def regularizer(state, beta):
  """sum(1 - |2 h(V) - 1|^beta): zero when every h(V) is 0 or 1."""
  return jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(state['v']) - 1.0) ** beta)


def finalize(kernel, state, spec: QuantSpec) -> QTensor:
  """Hard rounding floor(W / s) + [V >= 0]; codes equal ``fake_quant(..., hard=True)`` exactly."""
  grid_lib.check_kernel(kernel, spec, values=True)
  grid_lib.check_state(kernel, state, state_shapes(kernel.shape, spec))
  _, floor = _floor(kernel, state, spec)
  lo, hi = grid_lib.integer_bounds(state['zero_point'], spec, kernel.shape[-2])
  q = jnp.clip(floor + (state['v'] >= 0).astype(floor.dtype), lo, hi)
  codes = (q + _layout.expand(state['zero_point'], spec, kernel.shape[-2])).astype(code_dtype(spec))
  return QTensor(codes=codes, scale=jnp.asarray(state['scale'], jnp.float32),
                 zero_point=jnp.asarray(state['zero_point'], jnp.int32), spec=spec)


def beta_schedule(iters: int, beta=(20.0, 2.0), warmup: float = 0.2) -> np.ndarray:
  """beta per step, (iters,) float32: ``beta[0]`` during the warm-up, then linear to ``beta[1]`` (BRECQ's
  LinearTempDecay). Computed on the host in float64 and rounded once, so every step sees the same value as a
  host-side loop would pass in."""
  warm = int(warmup * iters)
  b0, b1 = float(beta[0]), float(beta[1])
  rel = [0.0 if i < warm else (i - warm) / max(1, iters - warm) for i in range(iters)]
  return np.asarray([b0 + (b1 - b0) * r for r in rel], np.float32)


def penalty(states, step, iters: int, reg: float = 0.01, beta=(20.0, 2.0), warmup: float = 0.2):
  """lambda * sum over the unit's kernels of regularizer(V, beta(step)); lambda = 0 during the warm-up.

  ``states``: the AdaRound states of one unit's kernels; ``step``: traced int32.
  """
  b = jnp.asarray(beta_schedule(iters, beta, warmup))[step]
  lam = jnp.where(step < int(warmup * iters), jnp.float32(0.0), jnp.float32(reg))
  total = 0.0
  for state in states:
    total = total + regularizer(state, b)
  return lam * total


def method(lr: float = 1e-3, reg: float = 0.01, beta=(20.0, 2.0), warmup: float = 0.2) -> Method:
  """AdaRound as a Method, BRECQ's defaults: Adam at a constant ``lr``, regulariser weight ``reg`` (0.1 for
  MobileNetV2 in BRECQ), beta annealed linearly from ``beta[0]`` to ``beta[1]`` after a ``warmup`` fraction of
  the iterations without regulariser. Soft rounding while training, hard rounding when finalized."""
  grid_lib.check_rate(lr, 'adaround lr')
  grid_lib.check_rate(reg, 'adaround reg')
  try:
    beta = tuple(float(b) for b in beta)
  except (TypeError, ValueError) as e:
    raise ValueError(f'adaround beta must be (start, end) numbers, got {beta!r}') from e
  if len(beta) != 2 or not np.isfinite(beta).all():
    raise ValueError(f'adaround beta must be (start, end), two finite numbers, got {beta!r}')
  if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not 0.0 <= warmup < 1.0:
    raise ValueError(f'adaround warmup must be a number in [0, 1), got {warmup!r}')
  return Method(name='adaround', hparams={'lr': lr, 'reg': reg, 'beta': list(beta), 'warmup': warmup}, init=init,
                fake_quant=ignoring_step(fake_quant),
                finalize=finalize, trainable=TRAINABLE, optimizer=lambda iters: optax.adam(lr),
                penalty=functools.partial(penalty, reg=reg, beta=beta, warmup=warmup))
