"""A learned-rounding method started from the GPTQ solution of the same layer (GPTQ -> FlexRound, GPTQ -> LRQ).

GPTQ rounds the inputs of a layer one at a time, compensating each rounding error on the inputs not rounded yet:
each input's weights are error-compensated, w~, right before they are rounded to the nearest grid point. Rounding
w~ with RTN's formula on GPTQ's grid gives exactly GPTQ's codes. So the combination

  grid      GPTQ's (RTN's initial grid of the kernel, fixed up front: per tensor, per channel, static groups)
  weights   the learned method divides w~ instead of W: ``inner.init(w~)`` with log_s1 / zero_point set to GPTQ's
            grid, so at step 0 (S2 = s3 = 1) its codes ARE GPTQ's codes, bit for bit
  training  the inner method's own loop (block reconstruction, its optimizer), from that start

Why w~ rather than W with S2 chosen to reproduce GPTQ's codes: FlexRound can only reach code q from W through
round(W / (s1 S2)), which needs a divisor per weight and breaks down for codes of the other sign or zero; starting
from w~ keeps the inner method exactly as it is (its reciprocal rule now scales with w~, which GPTQ has moved
only by the compensation of earlier rounding errors) and makes "no training" equal plain GPTQ.

The inner method must keep its grid in ``log_s1`` / ``zero_point`` (FlexRound and LRQ do). State: the inner
method's, plus ``w_base`` (w~, kernel shape, frozen), ``gptq_damp`` and ``gptq_retries``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from flexround_jax.quantizers import gptq
from flexround_jax.quantizers import grid as grid_lib
from flexround_jax.quantizers.base import Method
from flexround_jax.spec import QuantSpec

EXTRA = ('w_base', 'gptq_damp', 'gptq_retries')


def _inner_state(state):
  return {k: v for k, v in state.items() if k not in EXTRA}


def solve(kernel, spec: QuantSpec, hessian, *, inner: Method, gptq_knobs: dict) -> dict:
  if spec.granularity == 'per_group' and not gptq_knobs.get('static_groups', True):
    raise ValueError('GPTQ -> learned rounding needs a grid fixed up front: use static_groups=True')
  out = gptq.gptq_solve(kernel, hessian, spec, **gptq_knobs)
  dead = np.diag(np.asarray(hessian)) == 0
  w = jnp.where(jnp.asarray(dead)[:, None], 0.0, jnp.asarray(kernel, jnp.float32))
  log_s1, zero_point = grid_lib.init_grid(w, spec)          # the grid GPTQ used (rtn.init of the same kernel)
  if not np.array_equal(np.asarray(grid_lib.step_size(log_s1, spec)), np.asarray(out['scale'])):
    raise ValueError('the GPTQ grid and the learned method\'s s1 differ; cannot start from GPTQ exactly')
  w_base = jnp.asarray(out['w_prerounding'], jnp.float32)   # float32 whatever the kernel: exactly GPTQ's codes
  state = dict(inner.init(w_base, spec))
  state['log_s1'], state['zero_point'] = log_s1, zero_point
  state.update(w_base=w_base, gptq_damp=jnp.float32(out['damp']), gptq_retries=jnp.int32(out['retries']))
  return state


def start_from_gptq(inner: Method, damp: float = 0.01, block_size: int = 128, act_order: bool = True,
                    static_groups: bool = True) -> Method:
  """``inner`` (a learned method whose grid is ``log_s1`` / ``zero_point``) started from GPTQ's solution."""
  knobs = dict(damp=damp, block_size=block_size, act_order=act_order, static_groups=static_groups)
  gptq.method(**knobs)   # validates the knobs
  if inner.init is None or 'log_s1' not in inner.trainable:
    raise ValueError(f'method {inner.name!r} cannot start from GPTQ: it needs init() and a learned log_s1 grid')

  def solve_fn(kernel, spec, hessian):
    return solve(kernel, spec, hessian, inner=inner, gptq_knobs=knobs)

  return Method(
      name=f'gptq+{inner.name}', hparams={**inner.hparams, 'gptq': knobs}, solve=solve_fn,
      fake_quant=lambda kernel, state, spec, step, iters: inner.fake_quant(
          state['w_base'], _inner_state(state), spec, step, iters).astype(kernel.dtype),
      finalize=lambda kernel, state, spec: inner.finalize(state['w_base'], _inner_state(state), spec),
      trainable=inner.trainable, optimizer=inner.optimizer, penalty=inner.penalty,
      report=lambda state: {'gptq_damp': float(state['gptq_damp']), 'gptq_retries': int(state['gptq_retries'])})
