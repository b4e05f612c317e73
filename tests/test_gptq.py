"""GPTQ (../shared/reference/gptq.md): the closed-form baseline against RTN and a transcription of the reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from flexround_jax import QTensor, QuantSpec, _layout
from flexround_jax.quantizers import gptq, rtn

PER_CHANNEL = QuantSpec(bits=4)
PER_GROUP = QuantSpec(bits=4, granularity='per_group', group_size=16)


def correlated_layer(n_in=96, n_out=48, seed=0, dead=()):
  """Kernel (in, out), inputs X = Z A (4 in samples; mixed and unevenly scaled, so H is far from diagonal and
  act-order permutes), and H = 2/n X^T X, float32. Inputs listed in ``dead`` are always 0."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(4 * n_in, n_in))
  a = rng.normal(size=(n_in, n_in)) / np.sqrt(n_in) * rng.uniform(0.2, 2.0, size=n_in)
  x = (z @ a).astype(np.float32)
  x[:, np.array(dead, int)] = 0.0
  kernel = (0.1 * rng.normal(size=(n_in, n_out))).astype(np.float32)
  return jnp.asarray(kernel), x, (2.0 / len(x) * x.T @ x).astype(np.float32)


def output_error(x, kernel, kernel_hat):
  return float(np.sum((x @ (np.asarray(kernel, np.float64) - np.asarray(kernel_hat, np.float64))) ** 2))


def dequantized(out, spec):
  return QTensor(out['codes'], out['scale'], out['zero_point'], spec).dequantize()


def rtn_grid_rows(scale, zero_point, spec, n_in):
  """Per-input (scale, lo, hi) as numpy (in, out): RTN's centred integer bounds."""
  cmin, cmax = spec.code_range
  shape = (n_in, np.shape(scale)[-1])
  zp = np.broadcast_to(_layout.expand(np.asarray(zero_point, np.float64), spec, n_in), shape)
  return np.broadcast_to(_layout.expand(np.asarray(scale, np.float64), spec, n_in), shape), cmin - zp, cmax - zp


def reference_fasterquant(kernel, h, scale, lo, hi, percdamp=0.01, blocksize=128, actorder=True, find_params=None,
                          groupsize=None):
  """IST-DASLab/gptq ``GPTQ.fasterquant`` (9f2abd3) in float64 numpy, torch layout W (out, in).

  scale, lo, hi: (in, out) per-input grids, fixed (per channel, static groups); with ``find_params`` (W[:, group]
  (out, g) -> per-output (scale, lo, hi)) the grid of each group is refitted where the reference does (no act-order).
  Returns centred integers and the pre-rounding weights, (in, out) in natural order."""
  W = np.asarray(kernel, np.float64).T.copy()
  H = np.asarray(h, np.float64).copy()
  S, LO, HI = scale.T.copy(), lo.T.copy(), hi.T.copy()
  columns = W.shape[1]
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  perm = np.arange(columns)
  if actorder:
    perm = np.argsort(-np.diag(H), kind='stable')
    W, H, S, LO, HI = W[:, perm], H[perm][:, perm], S[:, perm], LO[:, perm], HI[:, perm]
  invperm = np.argsort(perm)
  Q, P = np.zeros_like(W), np.zeros_like(W)
  H[np.arange(columns), np.arange(columns)] += percdamp * np.mean(np.diag(H))
  L = np.linalg.cholesky(H)
  Hinv = np.linalg.cholesky(np.linalg.inv(L @ L.T)).T   # cholesky_inverse, then the upper factor
  for i1 in range(0, columns, blocksize):
    i2 = min(i1 + blocksize, columns)
    W1, Err1, Hinv1 = W[:, i1:i2].copy(), np.zeros((W.shape[0], i2 - i1)), Hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
      w, d, c = W1[:, i].copy(), Hinv1[i, i], i1 + i
      if find_params is not None and c % groupsize == 0:
        S[:, c:c + groupsize], LO[:, c:c + groupsize], HI[:, c:c + groupsize] = (
            v[:, None] for v in find_params(W[:, c:c + groupsize]))   # W, not W1: as of the block's start
      q = np.clip(np.round(w / S[:, c]), LO[:, c], HI[:, c])
      Q[:, c], P[:, c] = q, w
      err1 = (w - S[:, c] * q) / d
      W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
      Err1[:, i] = err1
    W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
  return Q[:, invperm].T, P[:, invperm].T


def rtn_codes(kernel, spec, grid=None):
  grid = rtn.init(kernel, spec) if grid is None else grid
  return np.asarray(rtn.finalize(kernel, grid, spec).codes)


@pytest.mark.parametrize('act_order', [True, False])
@pytest.mark.parametrize('bits', [3, 4])
@pytest.mark.parametrize('granularity', ['per_channel', 'per_group'])
def test_output_error_at_most_rtn_on_the_same_grid(granularity, bits, act_order):
  spec = QuantSpec(bits=bits, granularity=granularity, group_size=16 if granularity == 'per_group' else None)
  kernel, x, h = correlated_layer(seed=bits)
  out = gptq.gptq_solve(kernel, h, spec, act_order=act_order)
  grid = rtn.init(kernel, spec)
  np.testing.assert_array_equal(out['scale'], grid['scale'])
  np.testing.assert_array_equal(out['zero_point'], grid['zero_point'])
  rtn_error = output_error(x, kernel, rtn.finalize(kernel, grid, spec).dequantize())
  gptq_error = output_error(x, kernel, dequantized(out, spec))
  assert gptq_error <= 0.8 * rtn_error, (gptq_error, rtn_error)   # 0.3 to 0.6 on these layers


@pytest.mark.parametrize('bits', [3, 4])
def test_dynamic_groups_also_beat_rtn(bits):
  spec = QuantSpec(bits=bits, granularity='per_group', group_size=16)
  kernel, x, h = correlated_layer(seed=10 + bits)
  out = gptq.gptq_solve(kernel, h, spec, act_order=False, static_groups=False, block_size=40)
  rtn_error = output_error(x, kernel, rtn.finalize(kernel, rtn.init(kernel, spec), spec).dequantize())
  assert output_error(x, kernel, dequantized(out, spec)) <= 0.8 * rtn_error
  # Groups after the first are fitted to error-updated weights, not the original ones.
  assert not np.array_equal(out['scale'][1:], rtn.init(kernel, spec)['scale'][1:])


@pytest.mark.parametrize('act_order', [True, False])
@pytest.mark.parametrize('spec', [PER_CHANNEL, PER_GROUP, QuantSpec(bits=3, granularity='per_tensor'),
                                  QuantSpec(bits=3, symmetric=True, grid_init='mse'),
                                  QuantSpec(bits=2, granularity='per_group', group_size=20, symmetric=True)])
def test_diagonal_hessian_is_rtn_bit_for_bit(spec, act_order):
  kernel, _, _ = correlated_layer(seed=3)
  expected = rtn_codes(kernel, spec)
  # Unit diagonal: act-order permutes nothing; an uneven diagonal permutes, still with nothing to compensate.
  diagonal = np.random.default_rng(0).uniform(0.1, 3.0, 96).astype(np.float32)
  for h in (np.eye(96, dtype=np.float32), np.diag(diagonal)):
    out = gptq.gptq_solve(kernel, h, spec, act_order=act_order, block_size=40)
    assert np.asarray(out['codes']).dtype == expected.dtype
    np.testing.assert_array_equal(out['codes'], expected)
    np.testing.assert_array_equal(out['w_prerounding'], kernel)


def test_diagonal_hessian_dynamic_groups_is_rtn():
  kernel, _, _ = correlated_layer(seed=4)
  # minmax grids: a group's min and max do not depend on how the rows are sliced (an 'mse' score's sum might).
  for spec in (PER_GROUP, PER_GROUP.replace(group_size=20, symmetric=True)):
    out = gptq.gptq_solve(kernel, np.eye(96, dtype=np.float32), spec, act_order=False, static_groups=False,
                          block_size=40)
    np.testing.assert_array_equal(out['codes'], rtn_codes(kernel, spec))


@pytest.mark.parametrize('spec', [PER_CHANNEL, PER_GROUP.replace(bits=3)])
@pytest.mark.parametrize('act_order', [True, False])
def test_matches_reference_transcription(spec, act_order):
  kernel, _, h = correlated_layer(seed=5)
  out = gptq.gptq_solve(kernel, h, spec, act_order=act_order, block_size=40)
  rows = rtn_grid_rows(out['scale'], out['zero_point'], spec, kernel.shape[0])
  q_ref, pre_ref = reference_fasterquant(kernel, h, *rows, blocksize=40, actorder=act_order)
  q = np.asarray(out['codes'], np.float64) - (spec.code_range[0] - rows[1])   # codes - zero point
  # float32 against float64: a near-tie may round the other way, after which that output channel drifts a little.
  assert np.mean(q == q_ref) > 0.99
  np.testing.assert_allclose(out['w_prerounding'], pre_ref, atol=0.05 * float(np.max(rows[0])))
  assert np.median(np.abs(np.asarray(out['w_prerounding']) - pre_ref)) < 1e-4 * float(np.max(rows[0]))


@pytest.mark.parametrize('group_size', [16, 20])
def test_dynamic_groups_match_reference_transcription(group_size):
  spec = PER_GROUP.replace(bits=3, group_size=group_size)
  one_group = spec.replace(granularity='per_channel', group_size=None)
  kernel, _, h = correlated_layer(seed=13)
  out = gptq.gptq_solve(kernel, h, spec, act_order=False, static_groups=False, block_size=40)

  def find_params(w_group):
    grid = rtn.init(jnp.asarray(w_group.T, jnp.float32), one_group)
    return (row[0] for row in rtn_grid_rows(grid['scale'], grid['zero_point'], one_group, 1))

  nan = np.full(kernel.shape, np.nan)
  q_ref, pre_ref = reference_fasterquant(kernel, h, nan, nan, nan, blocksize=40, actorder=False,
                                         find_params=find_params, groupsize=group_size)
  rows = rtn_grid_rows(out['scale'], out['zero_point'], spec, kernel.shape[0])
  q = np.asarray(out['codes'], np.float64) - (spec.code_range[0] - rows[1])
  assert np.mean(q == q_ref) > 0.99
  assert np.median(np.abs(np.asarray(out['w_prerounding']) - pre_ref)) < 1e-4 * float(np.max(rows[0]))


def test_block_size_changes_only_float_rounding():
  kernel, _, h = correlated_layer(seed=6)
  one = gptq.gptq_solve(kernel, h, PER_GROUP, block_size=128)   # a single block
  many = gptq.gptq_solve(kernel, h, PER_GROUP, block_size=40)   # three blocks, the last one padded
  assert np.mean(np.asarray(one['codes']) == np.asarray(many['codes'])) > 0.99
  assert np.median(np.abs(np.asarray(one['w_prerounding']) - np.asarray(many['w_prerounding']))) < 1e-5


def test_act_order_static_groups_store_contiguous_natural_groups():
  kernel, _, h = correlated_layer(seed=7)
  assert not np.array_equal(np.argsort(-np.diag(h), kind='stable'), np.arange(len(h)))   # act-order permutes
  state = gptq.solve(kernel, PER_GROUP, h, act_order=True, static_groups=True)
  qt = gptq.finalize(kernel, state, PER_GROUP)
  grid = rtn.init(kernel, PER_GROUP)
  assert qt.scale.shape == (96 // 16, 48)
  np.testing.assert_array_equal(qt.scale, grid['scale'])
  np.testing.assert_array_equal(qt.zero_point, grid['zero_point'])
  np.testing.assert_array_equal(qt.dequantize(), gptq.fake_quant(kernel, state, PER_GROUP))


@pytest.mark.parametrize('kwargs', [dict(spec=PER_CHANNEL), dict(spec=PER_GROUP.replace(symmetric=True)),
                                    dict(spec=PER_GROUP, act_order=False, static_groups=False),
                                    dict(spec=QuantSpec(bits=3, granularity='per_tensor'), act_order=False)])
def test_rounding_prerounding_weights_gives_the_codes(kwargs):
  spec = kwargs.pop('spec')
  kernel, _, h = correlated_layer(seed=8)
  out = gptq.gptq_solve(kernel, h, spec, block_size=40, **kwargs)
  assert out['w_prerounding'].dtype == jnp.float32 and out['w_prerounding'].shape == kernel.shape
  grid = {'scale': out['scale'], 'zero_point': out['zero_point']}
  np.testing.assert_array_equal(rtn_codes(out['w_prerounding'], spec, grid), out['codes'])
  assert not np.array_equal(out['w_prerounding'], kernel)   # the error was compensated


@pytest.mark.parametrize('act_order', [True, False])
def test_dead_inputs_are_zero_and_finite(act_order):
  dead = np.array([3, 10, 50])
  kernel, x, h = correlated_layer(seed=9, dead=dead)
  assert np.all(np.diag(h)[dead] == 0)
  out = gptq.gptq_solve(kernel, h, PER_CHANNEL, act_order=act_order, block_size=40)
  w_hat = np.asarray(dequantized(out, PER_CHANNEL))
  assert np.isfinite(w_hat).all() and np.isfinite(np.asarray(out['w_prerounding'])).all()
  np.testing.assert_array_equal(w_hat[dead], 0.0)
  np.testing.assert_array_equal(np.asarray(out['w_prerounding'])[dead], 0.0)
  # The grid is the one of the kernel with those inputs zeroed.
  zeroed = kernel.at[dead].set(0.0)
  np.testing.assert_array_equal(out['scale'], rtn.init(zeroed, PER_CHANNEL)['scale'])
  assert out['retries'] == 0 and out['damp'] == 0.01


def test_failed_cholesky_retries_with_more_damping():
  # Eigenvalues in [0.5, 1.5] but one of -0.05: damp 0.01 * mean(diag) ~ 0.01 cannot lift it, 0.1 can.
  rng = np.random.default_rng(11)
  basis, _ = np.linalg.qr(rng.normal(size=(96, 96)))
  eigenvalues = np.linspace(0.5, 1.5, 96)
  eigenvalues[7] = -0.05
  h = ((basis * eigenvalues) @ basis.T).astype(np.float32)
  kernel = jnp.asarray(rng.normal(size=(96, 48)).astype(np.float32))
  m = gptq.method(damp=0.01, block_size=40)
  state = m.start(kernel, PER_CHANNEL, h)
  report = m.report(state)
  assert report['gptq_retries'] >= 1 and report['gptq_damp'] > 0.01
  assert report['gptq_damp'] == pytest.approx(0.01 * 10 ** report['gptq_retries'])
  assert np.isfinite(np.asarray(m.finalize(kernel, state, PER_CHANNEL).dequantize())).all()
  with pytest.raises(ValueError, match='not positive definite'):
    gptq.gptq_solve(kernel, h, PER_CHANNEL, max_retries=0)


def test_invalid_arguments_raise():
  kernel, _, h = correlated_layer()
  with pytest.raises(ValueError, match='static_groups'):
    gptq.gptq_solve(kernel, h, PER_GROUP, act_order=True, static_groups=False)
  with pytest.raises(ValueError, match='Dense kernels'):
    gptq.gptq_solve(jnp.zeros((3, 3, 8, 16)), np.eye(72, dtype=np.float32), PER_CHANNEL)
  with pytest.raises(ValueError, match=r'hessian must have shape \(96, 96\)'):
    gptq.gptq_solve(kernel, h[:32, :32], PER_CHANNEL)
  for knobs, name in [(dict(damp=0.0), 'damp'), (dict(damp=True), 'damp'), (dict(block_size=0), 'block_size'),
                      (dict(block_size=2.5), 'block_size'), (dict(act_order=1), 'act_order'),
                      (dict(static_groups='yes'), 'static_groups')]:
    with pytest.raises(ValueError, match=name):
      gptq.method(**knobs)
    with pytest.raises(ValueError, match=name):
      gptq.gptq_solve(kernel, h, PER_CHANNEL, **knobs)


def test_method_solves_and_round_trips():
  m = gptq.method(damp=0.05, block_size=40)
  assert m.name == 'gptq' and not m.trains and m.init is None and m.optimizer is None
  assert m.describe() == {'name': 'gptq', 'damp': 0.05, 'block_size': 40, 'act_order': True, 'static_groups': True}
  kernel, _, h = correlated_layer(seed=12)
  state = m.start(kernel, PER_GROUP, h)
  assert set(state) == {'codes', 'scale', 'zero_point', 'damp', 'retries'}
  assert m.report(state) == {'gptq_damp': pytest.approx(0.05), 'gptq_retries': 0}
  qt = m.finalize(kernel, state, PER_GROUP)
  np.testing.assert_array_equal(qt.codes, gptq.gptq_solve(kernel, h, PER_GROUP, damp=0.05, block_size=40)['codes'])
  w_hat = m.fake_quant(kernel, state, PER_GROUP, jnp.int32(0), 1)
  assert w_hat.dtype == kernel.dtype
  np.testing.assert_array_equal(w_hat, qt.dequantize())
