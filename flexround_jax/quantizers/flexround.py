"""FlexRound (Lee et al., ICML 2023): learnable rounding by element-wise division.

  W_hat = s1 * clamp(round_ste(W / (s1 * S2 * s3 [* s4])), -zp, 2^b - 1 - zp)

with every factor positive and learned in log space. s1 (grid size) is both divisor and the only multiplier;
S2 (one per weight), s3 (per output channel) and s4 (per input channel, convolutions only) are divisors that are
discarded after training, so the deployed model is plain uniform integer codes with step s1 and zero point zp.
Because the weight is divided by S, d loss / d log S2 = -s1 * W / S * d loss / d W_hat is proportional to W
(the paper's reciprocal rule): large weights can move further, beyond the nearest grid points.

State (Flax layouts: Dense kernel (in, out); Conv kernel (kh, kw, in_per_group, out)):
  log_s1      grid shape: () per tensor, (1, ..., 1, out) per channel, (1, ..., 1, in/group, out) per group
  log_s2      kernel shape, zeros at init
  log_s3      (1, ..., 1, out), zeros at init
  log_s4      (1, ..., 1, in_per_group, 1), conv kernels (rank > 2) only, zeros at init
  zero_point  int32, grid shape, fixed (never trained)
At init FlexRound is round-to-nearest on the initial grid, bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flexround_jax import _layout
from flexround_jax.qtensor import QTensor
from flexround_jax.quantizers import grid as grid_lib
from flexround_jax.quantizers.base import Method, ignoring_step
from flexround_jax.spec import QuantSpec

TRAINABLE: tuple[str, ...] = ('log_s1', 'log_s2', 'log_s3', 'log_s4')


def state_shapes(kernel_shape, spec: QuantSpec) -> dict[str, tuple[int, ...]]:
  kernel_shape = tuple(kernel_shape)
  rank = len(kernel_shape)
  grid = _layout.grid_shape(kernel_shape, spec)
  shapes = {'log_s1': grid, 'log_s2': kernel_shape, 'log_s3': (1,) * (rank - 1) + kernel_shape[-1:],
            'zero_point': grid}
  if rank > 2:  # convolution: per-input-channel divisor s4
    shapes['log_s4'] = (1,) * (rank - 2) + (kernel_shape[-2], 1)
  return shapes


def init(kernel, spec: QuantSpec) -> dict:
  grid_lib.check_kernel(kernel, spec, values=True)
  log_s1, zero_point = grid_lib.init_grid(kernel, spec)
  state = {'log_s1': log_s1, 'zero_point': zero_point}
  for key, shape in state_shapes(kernel.shape, spec).items():
    if key not in state:
      state[key] = jnp.zeros(shape, jnp.float32)
  return state


def _codes(kernel, state, spec: QuantSpec, round_fn):
  """s1 (broadcastable) and q = clamp(round(W / (s1 * S2 * s3 [* s4])))."""
  s1, x, lo, hi = _quotient(spec, kernel, grid_lib.step_size(state['log_s1'], spec), state['log_s2'], state['log_s3'],
                            state.get('log_s4'), state['zero_point'])
  return s1, grid_lib.clip_inclusive(round_fn(x), lo, hi)


def _quotient(spec, kernel, s1_grid, log_s2, log_s3, log_s4, zero_point):
  """s1 (broadcastable), the quotient x = W / (s1 * S2 * s3 [* s4]) and the integer bounds.

  The divisor is formed as s1 * exp(log_s2 + log_s3 [+ log_s4]), the same value as exp(log_s1 + ...) up to
  rounding, so that at init (exp(0) = 1) it is exactly RTN's step.
  """
  n_in = kernel.shape[-2]
  s1 = _layout.expand(s1_grid, spec, n_in)
  log_rest = log_s2 + log_s3 if log_s4 is None else log_s2 + log_s3 + log_s4
  lo, hi = grid_lib.integer_bounds(zero_point, spec, n_in)
  return s1, grid_lib.divide(kernel, s1 * jnp.exp(log_rest)), lo, hi


def fake_quant(kernel, state, spec: QuantSpec):
  """Training forward = deployed forward. Differentiable w.r.t. the ``log_*`` entries of ``state``."""
  grid_lib.check_kernel(kernel, spec)
  grid_lib.check_state(kernel, state, state_shapes(kernel.shape, spec))
  s1, q = _codes(kernel, state, spec, grid_lib.round_ste)
  return (s1 * q).astype(kernel.dtype)


def _sum_to(x, shape):
  """Sums ``x`` over the axes where ``shape`` (same rank) is 1: the backward of broadcasting to ``x.shape``."""
  axes = tuple(i for i, (n, m) in enumerate(zip(shape, x.shape)) if n == 1 and m != 1)
  return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(spec: QuantSpec, kernel, s1_grid, log_s2, log_s3, log_s4, zero_point):
  return _fused_fwd(spec, kernel, s1_grid, log_s2, log_s3, log_s4, zero_point)[0]


def _fused_fwd(spec, kernel, s1_grid, log_s2, log_s3, log_s4, zero_point):
  s1, x, lo, hi = _quotient(spec, kernel, s1_grid, log_s2, log_s3, log_s4, zero_point)
  w_hat = (s1 * jnp.clip(jnp.round(x), lo, hi)).astype(kernel.dtype)
  # Residuals are the inputs only (alive anyway): no kernel-sized float32 array is kept from forward to backward.
  return w_hat, (kernel, s1_grid, log_s2, log_s3, log_s4, zero_point)


def _fused_bwd(spec, residuals, g):
  kernel, s1_grid, log_s2, log_s3, log_s4, zero_point = residuals
  s1, x, lo, hi = _quotient(spec, *residuals)
  r = jnp.round(x)
  inside = (r >= lo) & (r <= hi)
  g = g.astype(jnp.float32)
  t = jnp.where(inside, g * x, 0.0)                    # d loss / d x * x / s1, zero where the clamp is active
  g_rest = -s1 * t                                     # d loss / d log(S2 s3 s4) = -s1 * x * g * 1[inside]
  g_s1 = _layout.reduce_to_grid(g * jnp.clip(r, lo, hi) - t, spec, jnp.sum)   # d w_hat / d s1 = q - x 1[inside]
  return (jnp.zeros_like(kernel), g_s1.reshape(jnp.shape(s1_grid)), g_rest.reshape(log_s2.shape),
          _sum_to(g_rest, log_s3.shape), None if log_s4 is None else _sum_to(g_rest, log_s4.shape),
          np.zeros(np.shape(zero_point), jax.dtypes.float0))   # the zero point is an integer: no gradient


_fused.defvjp(_fused_fwd, _fused_bwd)


def fake_quant_fused(kernel, state, spec: QuantSpec):
  """``fake_quant`` with the same forward and a closed-form backward (see ``method(fused_grad=True)``)."""
  grid_lib.check_kernel(kernel, spec)
  grid_lib.check_state(kernel, state, state_shapes(kernel.shape, spec))
  s1_grid = grid_lib.step_size(state['log_s1'], spec)
  return _fused(spec, kernel, s1_grid, state['log_s2'], state['log_s3'], state.get('log_s4'), state['zero_point'])


def finalize(kernel, state, spec: QuantSpec) -> QTensor:
  """Integer codes with the learned s1 and the fixed zero point; S2, s3, s4 are dropped."""
  grid_lib.check_kernel(kernel, spec, values=True)
  grid_lib.check_state(kernel, state, state_shapes(kernel.shape, spec))
  _, q = _codes(kernel, state, spec, jnp.round)
  return grid_lib.codes_on_learned_grid(q, state, spec, kernel.shape[-2])


def method(lr: float = 3e-3, lr_s1: float | None = None, fused_grad: bool = False) -> Method:
  """FlexRound as a Method. ``lr``: Adam rate with cosine decay (3e-3: the official W4 Llama-2-7B script);
  ``lr_s1``: a separate rate for log_s1 (None: ``lr``; the official code uses one rate).

  ``fused_grad``: the same forward, with the gradient in closed form (d loss / d log S2 = -s1 * x * g on the
  unclamped entries, x = W / (s1 S2 s3), its sums for s3 / s4, and sum(g * (q - x 1[unclamped])) for s1) computed
  in one pass from the kernel and the state, instead of autodiff's chain through the division, which keeps 4-5
  kernel-sized float32 arrays alive per kernel. Lower step memory; the gradient's floating-point order differs from
  autodiff's, so results are not bit-identical to the default (off) and the committed results use the default.
  """
  grid_lib.check_rate(lr, 'flexround lr')
  if lr_s1 is not None:
    grid_lib.check_rate(lr_s1, 'flexround lr_s1')
  if not isinstance(fused_grad, bool):
    raise ValueError(f'flexround fused_grad must be True or False, got {fused_grad!r}')
  # The knob enters hparams (and so fingerprints and reports) only when on: runs made before it existed resume.
  hparams = {'lr': lr, 'lr_s1': lr_s1, **({'fused_grad': True} if fused_grad else {})}
  return Method(name='flexround', hparams=hparams, init=init,
                fake_quant=ignoring_step(fake_quant_fused if fused_grad else fake_quant),
                finalize=finalize, trainable=TRAINABLE,
                optimizer=functools.partial(grid_lib.adam_cosine, lr=lr, lr_s1=lr_s1))
