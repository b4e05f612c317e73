"""GPTQ (Frantar et al., ICLR 2023): closed-form rounding with second-order error compensation, as a baseline.

Given the Hessian of the layer-wise squared error H = 2/n sum_x x x^T (in, in), GPTQ rounds one input dimension
at a time and spreads its rounding error over the not-yet-rounded ones (IST-DASLab/gptq, ``fasterquant``):

  dead inputs (H_ii = 0): H_ii = 1, weights zeroed;  H += damp * mean(diag H) * I
  act-order: inputs by descending diag(H);  U = upper Cholesky factor of H^-1
  per input i, in blocks of B:  q_i = quant(w_i);  err = (w_i - q_i) / U_ii;  w_j -= err * U_ij  (j > i)

the updates beyond the current block being applied once per block (lazy batch updates). A failed Cholesky is
retried with damp x 10; the damping used is part of the state.

Layout: Flax Dense kernels are (in, out), so GPTQ's weight *columns* (input dimensions, torch's ``W[:, i]``) are
the *rows* ``kernel[i, :]`` here, and ``quant`` is RTN's formula on one row, so GPTQ with a diagonal Hessian
is RTN bit for bit.

Grids are RTN's (``rtn.init`` on the kernel with dead inputs zeroed). Per group, "static groups" fixes every group's
grid up front in natural input order and act-order looks each input's group up through the permutation, so the
deployed QTensor is an ordinary contiguous per-group grid. Without static groups (the reference default) each
group's grid comes from the error-updated weights as the sweep reaches the group; that needs natural order, as groups
formed in act-order cannot be stored as a per-group grid (refused).

State: ``codes`` (kernel shape), ``scale`` (float32, grid shape), ``zero_point`` (int32, grid shape), ``damp``
(float32 scalar, the damping fraction used), ``retries`` (int32 scalar). Nothing is trainable.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flexround_jax import _layout
from flexround_jax.qtensor import QTensor, code_dtype
from flexround_jax.quantizers import grid as grid_lib
from flexround_jax.quantizers import rtn
from flexround_jax.quantizers.base import Method
from flexround_jax.spec import QuantSpec

TRAINABLE: tuple[str, ...] = ()
DAMP_GROWTH = 10.0


def state_shapes(kernel_shape, spec: QuantSpec) -> dict[str, tuple[int, ...]]:
  grid = _layout.grid_shape(tuple(kernel_shape), spec)
  return {'codes': tuple(kernel_shape), 'scale': grid, 'zero_point': grid, 'damp': (), 'retries': ()}


def _check_knobs(damp, block_size, act_order, static_groups, max_retries=0):
  if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp > 0 or not np.isfinite(damp):
    raise ValueError(f'gptq damp must be a positive number (fraction of mean(diag H)), got {damp!r}')
  for name, value, low in (('block_size', block_size, 1), ('max_retries', max_retries, 0)):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f'gptq {name} must be an integer >= {low}, got {value!r}')
  for name, value in (('act_order', act_order), ('static_groups', static_groups)):
    if not isinstance(value, bool):
      raise ValueError(f'gptq {name} must be a bool, got {value!r}')


@jax.jit
def _inverse_factor(hessian, damp):
  """Upper Cholesky factor U of (H + damp I)^-1 (H^-1 = U^T U), (in, in); NaN where a factorisation fails."""
  n = hessian.shape[0]
  low = jnp.linalg.cholesky(hessian + damp * jnp.eye(n, dtype=hessian.dtype))
  inverse = jax.scipy.linalg.cho_solve((low, True), jnp.eye(n, dtype=hessian.dtype))  # torch.cholesky_inverse
  # triu: the in-block update relies on exact zeros below the diagonal to leave rounded rows untouched.
  return jnp.triu(jnp.linalg.cholesky(inverse, upper=True))


@functools.partial(jax.jit, static_argnames='size')
def _lazy_batch(w, hinv, scale, lo, hi, start, *, size):
  """One block of ``size`` inputs (rows start..start+size of the permuted problem), rounded one row at a time.

  w, scale, lo, hi: (n, out), n a multiple of ``size``: current weights and each row's grid (step, centred integer
  bounds); hinv: (n, n) upper factor U. Returns w with the block's error applied to every later row (rows up to the
  block's end are returned unchanged), and the block's (size, out) centred integers q and pre-rounding weights.
  """
  rows = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size)
  w1, s1, lo1, hi1, h_rows = rows(w), rows(scale), rows(lo), rows(hi), rows(hinv)
  h1 = jax.lax.dynamic_slice_in_dim(h_rows, start, size, axis=1)

  def column(i, carry):
    w1, q1, pre, err = carry
    w_i, s_i = w1[i], s1[i]
    q_i = jnp.clip(jnp.round(grid_lib.divide(w_i, s_i)), lo1[i], hi1[i])   # rtn._codes on one row, same ops
    e_i = (w_i - s_i * q_i) / h1[i, i]
    # U is upper triangular, so rows before i subtract exact zeros and keep their bits.
    w1 = w1 - h1[i][:, None] * e_i[None, :]
    return w1, q1.at[i].set(q_i), pre.at[i].set(w_i), err.at[i].set(e_i)

  zeros = jnp.zeros_like(w1)
  _, q1, pre, err = jax.lax.fori_loop(0, size, column, (w1, zeros, zeros, zeros))
  # One fixed-shape product for every block (no recompiles); the mask keeps rows up to the block's end exact.
  later = (jnp.arange(w.shape[0]) >= start + size)[:, None]
  update = jnp.matmul(h_rows.T, err, precision=jax.lax.Precision.HIGHEST)   # float32 as the reference (no TF32)
  return w - jnp.where(later, update, 0.0), q1, pre


def _row_grid(scale, zero_point, spec: QuantSpec, shape):
  """Step and centred integer bounds of every row of a grid, each broadcast to ``shape`` = (rows, out)."""
  lo, hi = grid_lib.integer_bounds(zero_point, spec, shape[0])
  return tuple(jnp.broadcast_to(a, shape) for a in (_layout.expand(scale, spec, shape[0]), lo, hi))


@functools.partial(jax.jit, static_argnames=('size', 'spec'))
def _fit_group(w, grid, rows, group, *, size: int, spec: QuantSpec):
  """Grid of group ``group`` (``size`` rows from ``group * group_size``) fitted to the current weights ``w``.

  As the reference's ``find_params(W[:, i:i + groupsize])`` at the group's first input, these are the weights as of
  the start of the block holding that input (updates made inside the block are not seen). ``w`` is natural order
  (n_pad, out); ``grid`` = (scale, zero_point) in grid shape and ``rows`` = per-row (scale, lo, hi), (n_pad, out),
  are returned with the group's entries set. ``group`` is traced, so one compilation serves every full group.
  """
  start = group * spec.group_size
  one_group = spec.replace(granularity='per_channel', group_size=None)
  log_s, zp = grid_lib.init_grid(jax.lax.dynamic_slice_in_dim(w, start, size), one_group)
  s = grid_lib.step_size(log_s, one_group)
  grid = tuple(jax.lax.dynamic_update_slice_in_dim(g, v, group, 0) for g, v in zip(grid, (s, zp)))
  fitted = _row_grid(s, zp, one_group, (size, w.shape[1]))
  rows = tuple(jax.lax.dynamic_update_slice_in_dim(r, v, start, 0) for r, v in zip(rows, fitted))
  return grid, rows


def _sweep(w, hinv, rows, block_size: int, spec: QuantSpec, grid=None):
  """GPTQ over the rows of ``w`` (in, out), in the order given, with ``hinv`` the (in, in) upper factor U.

  ``rows`` = (scale, lo, hi), each (in, out): the grid of every row. With ``grid`` = (scale, zero_point) in grid
  shape, groups are instead fitted as the sweep reaches them (``_fit_group``; natural order only).
  Returns (q, pre, grid): centred integers and pre-rounding weights (in, out), in the order of ``w``.
  """
  n_in = w.shape[0]
  size = min(block_size, n_in)
  pad = -n_in % size
  # Padded rows: zero weights, unit step, U_ii = 1 and no coupling, so they round to 0 and move nothing.
  w = jnp.pad(w, ((0, pad), (0, 0)))
  hinv = jnp.pad(hinv, ((0, pad), (0, pad))) + jnp.diag((jnp.arange(n_in + pad) >= n_in).astype(hinv.dtype))
  rows = tuple(jnp.pad(r, ((0, pad), (0, 0)), constant_values=fill) for r, fill in zip(rows, (1.0, 0.0, 0.0)))
  qs, pres = [], []
  for start in range(0, n_in, size):
    if grid is not None:   # groups whose first input is in this block
      g = spec.group_size
      for group in range(-(-start // g), -(-min(start + size, n_in) // g)):
        grid, rows = _fit_group(w, grid, rows, group, size=min(g, n_in - group * g), spec=spec)
    w, q, pre = _lazy_batch(w, hinv, *rows, start, size=size)
    qs.append(q)
    pres.append(pre)
  return jnp.concatenate(qs)[:n_in], jnp.concatenate(pres)[:n_in], grid


def gptq_solve(kernel, hessian, spec: QuantSpec, *, damp: float = 0.01, block_size: int = 128,
               act_order: bool = True, static_groups: bool = True, max_retries: int = 5) -> dict:
  """GPTQ on a Dense kernel (in, out) given its input Hessian ``hessian`` (in, in) = 2/n sum_x x x^T.

  Returns {'codes': (in, out) ``code_dtype(spec)``, 'scale': float32 grid shape, 'zero_point': int32 grid shape,
  'w_prerounding': float32 (in, out), each input's error-compensated weights right before rounding (RTN's formula
  on the returned grid turns them into exactly ``codes``), 'damp': the damping fraction used (float; ``damp``
  times 10 per retry), 'retries': int}. All arrays in natural input order.
  """
  _check_knobs(damp, block_size, act_order, static_groups, max_retries)
  if getattr(kernel, 'ndim', None) != 2:
    raise ValueError(f'gptq quantizes Dense kernels (in, out), got shape {tuple(getattr(kernel, "shape", ()))}; '
                     'use another method for conv kernels via rules')
  grid_lib.check_kernel(kernel, spec, values=True)
  n_in, n_out = kernel.shape
  h = np.array(hessian, dtype=np.float32)
  if h.shape != (n_in, n_in):
    raise ValueError(f'gptq hessian must have shape ({n_in}, {n_in}) for a kernel of shape {tuple(kernel.shape)}, '
                     f'got {h.shape}')
  if not np.isfinite(h).all():
    raise ValueError('gptq hessian contains NaN or Inf')
  dynamic_groups = spec.granularity == 'per_group' and not static_groups
  if dynamic_groups and act_order:
    raise ValueError('gptq act_order=True with static_groups=False forms groups in permuted order, which a '
                     'per-group grid cannot store; use static_groups=True or act_order=False')

  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w = jnp.where(jnp.asarray(dead)[:, None], 0.0, jnp.asarray(kernel, jnp.float32))
  # Stable: inputs with equal diag(H) keep their natural order (a constant diagonal permutes nothing).
  perm = np.argsort(-np.diag(h), kind='stable') if act_order else np.arange(n_in)
  h = h[perm][:, perm]
  if dynamic_groups:
    shape = _layout.grid_shape(kernel.shape, spec)
    grid = (jnp.ones(shape, jnp.float32), jnp.zeros(shape, jnp.int32))   # every group is set before its use
  else:
    grid = tuple(rtn.init(w, spec)[k] for k in ('scale', 'zero_point'))
  # Static grids: each permuted row reads its own natural-order group, so the stored grid stays contiguous.
  rows = tuple(r[perm] for r in _row_grid(*grid, spec, (n_in, n_out)))

  mean_diag = float(np.mean(np.diag(h)))
  h = jnp.asarray(h)
  frac = float(damp)
  for retries in range(max_retries + 1):
    hinv = _inverse_factor(h, jnp.float32(frac * mean_diag))
    if np.isfinite(np.asarray(hinv)).all():
      q, pre, swept_grid = _sweep(w[perm], hinv, rows, block_size, spec, grid if dynamic_groups else None)
      if np.isfinite(np.asarray(pre)).all():
        break
    frac *= DAMP_GROWTH
  else:
    raise ValueError(f'gptq: no finite solution up to damp={frac / DAMP_GROWTH:g} ({max_retries} retries): the '
                     'damped Hessian is not positive definite; is it 2/n sum x x^T of real inputs?')
  grid = swept_grid if dynamic_groups else grid
  inv_perm = np.argsort(perm)
  q, pre = q[inv_perm], pre[inv_perm]
  codes = (q + _layout.expand(grid[1], spec, n_in)).astype(code_dtype(spec))   # as rtn.finalize
  return {'codes': codes, 'scale': jnp.asarray(grid[0], jnp.float32), 'zero_point': jnp.asarray(grid[1], jnp.int32),
          'w_prerounding': pre, 'damp': frac, 'retries': retries}


def solve(kernel, spec: QuantSpec, hessian, **knobs) -> dict:
  """State for ``finalize`` (see the module docstring); ``knobs`` as ``gptq_solve``."""
  out = gptq_solve(kernel, hessian, spec, **knobs)
  return {'codes': out['codes'], 'scale': out['scale'], 'zero_point': out['zero_point'],
          'damp': jnp.float32(out['damp']), 'retries': jnp.int32(out['retries'])}


def finalize(kernel, state, spec: QuantSpec) -> QTensor:
  grid_lib.check_kernel(kernel, spec)
  grid_lib.check_state(kernel, state, state_shapes(kernel.shape, spec))
  return QTensor(codes=jnp.asarray(state['codes'], code_dtype(spec)), scale=jnp.asarray(state['scale'], jnp.float32),
                 zero_point=jnp.asarray(state['zero_point'], jnp.int32), spec=spec)


def fake_quant(kernel, state, spec: QuantSpec, step=None, iters=None):
  """The deployed kernel, ``finalize(...).dequantize()`` in the kernel's dtype (GPTQ trains nothing: no gradient)."""
  del step, iters
  return finalize(kernel, state, spec).dequantize(kernel.dtype)


def method(damp: float = 0.01, block_size: int = 128, act_order: bool = True, static_groups: bool = True) -> Method:
  """GPTQ as a closed-form ``Method``: ``solve`` from the input Hessian, nothing trained."""
  _check_knobs(damp, block_size, act_order, static_groups)
  knobs = dict(damp=damp, block_size=block_size, act_order=act_order, static_groups=static_groups)
  return Method(name='gptq', hparams=knobs, solve=functools.partial(solve, **knobs), fake_quant=fake_quant,
                finalize=finalize, trainable=TRAINABLE, optimizer=None,
                report=lambda state: {'gptq_damp': float(state['damp']), 'gptq_retries': int(state['retries'])})
