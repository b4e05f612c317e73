"""LRQ (Lee et al., 2024, arXiv:2407.11534): FlexRound with the per-weight divisor S2 replaced by a low-rank one.

  W_hat = s1 * clamp(round_ste(W / (s1 * exp(lrq_u @ lrq_l + log_r + log_c))), -zp, 2^b - 1 - zp)    W (in, out)

Official code (``mode='lrq'``, torch Linear W (out, in)): S = exp(theta1 + L U + r + c) with L (out, R) init 0,
U (R, in) Kaiming-uniform (``kaiming_uniform_(U, a=sqrt(5))``: uniform(-1/sqrt(in), 1/sqrt(in))), r (out, 1) and
c (1, in) init 0. In the Flax Dense layout (in, out) the log divisor is the transpose, (L U)^T = U^T L^T, so the
state stores the factors already transposed:
  log_s1      grid shape, as FlexRound: () per tensor, (1, out) per channel, (ceil(in/group), out) per group
  lrq_u       (in, R)   U^T, Kaiming-uniform in +-1/sqrt(in), drawn from ``jax.random.key(seed)`` folded with (in, out)
  lrq_l       (R, out)  L^T, zeros at init
  log_r       (1, out)  per output channel (FlexRound's s3), zeros at init
  log_c       (in, 1)   per input channel, zeros at init
  zero_point  int32, grid shape, fixed (never trained)
Learned entries per kernel: |grid| + R (in + out) + in + out, against FlexRound's |grid| + in out + out: far
fewer when R << in out / (in + out) (a 4096 x 11008 Llama-2 kernel at the official R = 1024: 15.5M against 45.1M).
At rank >= min(in, out) lrq_u @ lrq_l is any matrix and the low-rank form saves nothing, so that is refused.
At init lrq_l = 0 makes the product exactly 0, so LRQ is round-to-nearest on the initial grid, bit for bit (lrq_u's
gradient is 0 until lrq_l moves). Deployed: integer codes with the learned s1 and fixed zp; U, L, r, c are dropped,
as FlexRound drops S2, s3, s4. Dense (rank-2) kernels only; give convolutions another method through the rules.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flexround_jax import _layout
from flexround_jax.qtensor import QTensor
from flexround_jax.quantizers import grid as grid_lib
from flexround_jax.quantizers.base import Method, ignoring_step
from flexround_jax.spec import QuantSpec

TRAINABLE: tuple[str, ...] = ('log_s1', 'lrq_u', 'lrq_l', 'log_r', 'log_c')


def _check_rank(rank) -> None:
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f'lrq rank must be a positive integer, got {rank!r}')


def state_shapes(kernel_shape, spec: QuantSpec, rank: int) -> dict[str, tuple[int, ...]]:
  """State shapes for a Dense kernel (in, out) at low rank ``rank`` (< min(in, out))."""
  kernel_shape = tuple(kernel_shape)
  if len(kernel_shape) != 2:
    raise ValueError(f'LRQ is defined for Dense kernels (in, out); got a kernel of shape {kernel_shape}. '
                     'Use rules to give conv layers another method')
  _check_rank(rank)
  n_in, n_out = kernel_shape
  if rank >= min(n_in, n_out):
    raise ValueError(f'LRQ rank {rank} >= min(in, out) = {min(n_in, n_out)} for a kernel of shape {kernel_shape}: '
                     'the low-rank form saves nothing there (use FlexRound)')
  grid = _layout.grid_shape(kernel_shape, spec)
  return {'log_s1': grid, 'lrq_u': (n_in, rank), 'lrq_l': (rank, n_out), 'log_r': (1, n_out), 'log_c': (n_in, 1),
          'zero_point': grid}


@functools.partial(jax.jit, static_argnums=(1, 2, 3))  # one compilation per shape, not one per random primitive
def _kaiming_uniform(seed: int, n_in: int, n_out: int, rank: int):
  """U^T (in, R) ~ uniform(+-1/sqrt(in)): torch's kaiming_uniform_(U, a=sqrt(5)) on U (R, in), fan_in = in."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), n_in), n_out)
  bound = 1.0 / np.sqrt(n_in)
  return jax.random.uniform(key, (n_in, rank), jnp.float32, -bound, bound)


def init(kernel, spec: QuantSpec, *, rank: int, seed: int = 0) -> dict:
  """Initial state (see the module docstring); deterministic in (seed, kernel shape)."""
  grid_lib.check_kernel(kernel, spec, values=True)
  shapes = state_shapes(kernel.shape, spec, rank)
  log_s1, zero_point = grid_lib.init_grid(kernel, spec)
  state = {'log_s1': log_s1, 'zero_point': zero_point, 'lrq_u': _kaiming_uniform(seed, *kernel.shape, rank)}
  for name in ('lrq_l', 'log_r', 'log_c'):
    state[name] = jnp.zeros(shapes[name], jnp.float32)
  return state


def _check(kernel, state, spec: QuantSpec) -> None:
  """check_state for an LRQ state, its rank read from ``lrq_u`` (in, R)."""
  u = state.get('lrq_u') if isinstance(state, Mapping) else None
  rank = np.shape(u)[-1] if u is not None and np.ndim(u) == 2 else 1   # a wrong lrq_u fails check_state below
  grid_lib.check_state(kernel, state, state_shapes(kernel.shape, spec, rank))


def _codes(kernel, state, spec: QuantSpec, round_fn):
  """s1 (broadcastable) and q = clamp(round(W / (s1 * exp(lrq_u @ lrq_l + log_r + log_c)))), both (in, out).

  The divisor is formed as s1 * exp(...), like FlexRound's, so that at init (lrq_l = 0, so the product is 0, and
  exp(0) = 1) it is exactly RTN's step. HIGHEST precision keeps the product in float32 on accelerators that would
  otherwise multiply in bfloat16.
  """
  n_in = kernel.shape[-2]
  s1 = _layout.expand(grid_lib.step_size(state['log_s1'], spec), spec, n_in)
  low_rank = jnp.matmul(state['lrq_u'], state['lrq_l'], precision=jax.lax.Precision.HIGHEST)
  log_rest = low_rank + state['log_r'] + state['log_c']
  lo, hi = grid_lib.integer_bounds(state['zero_point'], spec, n_in)
  x = grid_lib.divide(kernel, s1 * jnp.exp(log_rest))
  return s1, grid_lib.clip_inclusive(round_fn(x), lo, hi)


def fake_quant(kernel, state, spec: QuantSpec):
  """Training forward = deployed forward, (in, out). Differentiable w.r.t. the TRAINABLE entries of ``state``."""
  grid_lib.check_kernel(kernel, spec)
  _check(kernel, state, spec)
  s1, q = _codes(kernel, state, spec, grid_lib.round_ste)
  return (s1 * q).astype(kernel.dtype)


def finalize(kernel, state, spec: QuantSpec) -> QTensor:
  """Integer codes with the learned s1 and the fixed zero point; U, L, r, c are dropped."""
  grid_lib.check_kernel(kernel, spec, values=True)
  _check(kernel, state, spec)
  _, q = _codes(kernel, state, spec, jnp.round)
  return grid_lib.codes_on_learned_grid(q, state, spec, kernel.shape[-2])


def method(rank: int, lr: float = 3e-3, lr_s1: float | None = None, seed: int = 0) -> Method:
  """LRQ as a Method: low-rank ``rank`` divisor, Adam(lr) with cosine decay, optional own rate ``lr_s1`` for s1.

  ``seed`` picks the Kaiming-uniform U (folded with each kernel's shape). Kernels must be Dense with
  min(in, out) > rank; ``init`` raises otherwise.
  """
  _check_rank(rank)
  grid_lib.check_rate(lr, 'lrq lr')
  if lr_s1 is not None:
    grid_lib.check_rate(lr_s1, 'lrq lr_s1')
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f'lrq seed must be an integer, got {seed!r}')
  return Method(name='lrq', hparams={'rank': int(rank), 'lr': lr, 'lr_s1': lr_s1, 'seed': int(seed)},
                init=functools.partial(init, rank=int(rank), seed=int(seed)), fake_quant=ignoring_step(fake_quant),
                finalize=finalize, trainable=TRAINABLE,
                optimizer=functools.partial(grid_lib.adam_cosine, lr=lr, lr_s1=lr_s1))
