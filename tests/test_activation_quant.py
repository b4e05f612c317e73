"""Activation quantizers (quantizers/activation.py): QDrop's LSQ step and LRQ's dynamic per-token grid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexround_jax.quantizers import activation as act

shapes = st.sampled_from([(7,), (3, 5), (2, 4, 6), (1, 33)])


def _x(seed, shape, shift=0.0, scale=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale + shift).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), shape=shapes, bits=st.sampled_from([2, 4, 8]),
       shift=st.floats(-2, 2), scale=st.floats(0.01, 10))
def test_lsq_codes_in_range_and_fake_quant_is_the_dequantized_codes(seed, shape, bits, shift, scale):
  x = _x(seed, shape, shift, scale)
  state = act.lsq_calibrate(x, bits, search='minmax')
  x_test = _x(seed + 1, shape, shift, 2 * scale)   # wider than calibration: some codes clip
  codes = np.asarray(act.lsq_codes(x_test, state, bits))
  assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1
  step, zp = np.float32(state['step']), int(state['zero_point'])
  expected = (codes.astype(np.float32) - np.float32(zp)) * step
  np.testing.assert_array_equal(np.asarray(act.lsq_fake_quant(jnp.asarray(x_test), state, bits)), expected)


def _qdrop_search_numpy(x, bits):
  """A transcription of QDrop's MSEObserver loops (per tensor, asymmetric) in float32 numpy."""
  x = x.astype(np.float32)
  qmax = 2 ** bits - 1

  def qparams(lo, hi):
    lo, hi = np.float32(min(lo, 0.0)), np.float32(max(hi, 0.0))
    scale = np.float32(max(np.float32(hi - lo) / np.float32(qmax), np.float32(1e-8)))
    zp = np.float32(np.clip(-np.round(lo / scale), 0, qmax))
    return scale, zp

  def score(lo, hi):
    s, zp = qparams(lo, hi)
    xq = (np.clip(np.round(x / s) + zp, 0, qmax) - zp) * s
    return np.mean(np.abs(xq - x).astype(np.float32) ** np.float32(2.4), dtype=np.float32)

  x_min, x_max = np.float32(x.min()), np.float32(x.max())
  best = (x_min, x_max, np.float32(1e10))
  if x_min >= 0 or x_max <= 0:
    xrange = max(abs(x_min), x_max)
    for i in range(1, 101):
      thres = np.float32(xrange / np.float32(100) * np.float32(i))
      lo = np.float32(0) if x_min >= 0 else -thres
      hi = np.float32(0) if x_max <= 0 else thres
      sc = score(lo, hi)
      if sc < best[2]:
        best = (lo, hi, sc)
  else:
    xrange = np.float32(x_max - x_min)
    for i in range(1, 101):
      tmp_max = np.float32(xrange / np.float32(100) * np.float32(i))
      delta = np.float32(tmp_max / np.float32(qmax))
      for zp in range(qmax + 1):
        lo, hi = np.float32(-np.float32(zp) * delta), np.float32(tmp_max - np.float32(zp) * delta)
        sc = score(lo, hi)
        if sc < best[2]:
          best = (lo, hi, sc)
  return qparams(best[0], best[1])


@pytest.mark.parametrize('case', ['two_sided', 'relu', 'negative'])
def test_lsq_search_matches_qdrop_mse_observer_and_beats_min_max(case):
  x = _x(0, (400,), 0.3, 1.0)
  x = {'two_sided': x, 'relu': np.maximum(x, 0), 'negative': -np.abs(x)}[case]
  x[0] = 6.0 if case != 'negative' else -6.0   # an outlier: the search clips it
  state = act.lsq_calibrate(x, 3)
  scale, zp = _qdrop_search_numpy(x, 3)
  np.testing.assert_allclose(float(state['step']), scale, rtol=1e-5)
  assert int(state['zero_point']) == int(zp)
  err = lambda s: float(jnp.mean(jnp.abs(act.lsq_fake_quant(jnp.asarray(x), s, 3) - x) ** 2.4))
  assert err(state) < err(act.lsq_calibrate(x, 3, search='minmax'))


def test_lsq_step_gradient_is_the_scaled_straight_through_derivative_by_finite_differences():
  x = jnp.asarray(_x(1, (6, 50), 0.2, 1.0))
  bits = 4
  state = act.lsq_calibrate(x, bits, search='minmax')
  state = {**state, 'step': state['step'] * 0.7}   # some elements clip at both ends
  w = jnp.asarray(_x(2, (6, 50)))                   # a fixed linear loss sum(w * x_hat)
  grad = jax.grad(lambda s: jnp.sum(w * act.lsq_fake_quant(x, {**state, 'step': s}, bits)))(state['step'])
  # The straight-through surrogate: rounding frozen at s0, so it is differentiable in s; its derivative at s0 is
  # the gradient LSQ uses, before the 1 / sqrt(N * qmax) scaling.
  s0, zp, qmax = np.float64(state['step']), float(state['zero_point']), 2 ** bits - 1
  xd, wd = np.asarray(x, np.float64), np.asarray(w, np.float64)
  frozen = np.round(xd / s0)

  inside = (frozen + zp >= 0) & (frozen + zp <= qmax)   # torch.clamp's gradient: 1 on the closed interval

  def surrogate(s):
    v = frozen + (xd / s - xd / s0) + zp
    return np.sum(wd * (np.where(inside, v, np.clip(frozen + zp, 0, qmax)) - zp) * s)

  h = s0 * 1e-6
  fd = (surrogate(s0 + h) - surrogate(s0 - h)) / (2 * h)
  g = 1.0 / np.sqrt(x.size * qmax)
  np.testing.assert_allclose(float(grad), g * fd, rtol=1e-4)
  assert (~inside).any() and inside.any()


def test_lsq_input_gradient_passes_inside_the_grid_and_stops_outside():
  x = jnp.asarray(np.linspace(-3, 3, 61, dtype=np.float32))
  state = {'step': jnp.float32(0.1), 'zero_point': jnp.int32(8)}   # 4 bits: [-0.8, 0.7]
  g = np.asarray(jax.grad(lambda v: jnp.sum(act.lsq_fake_quant(v, state, 4)))(x))
  xs = np.asarray(x)
  np.testing.assert_array_equal(g[(xs > -0.75) & (xs < 0.65)], 1.0)
  np.testing.assert_array_equal(g[(xs < -0.9) | (xs > 0.8)], 0.0)


def test_lsq_negative_or_zero_step_is_used_as_its_positive_value():
  x = jnp.asarray(_x(3, (20,)))
  state = act.lsq_calibrate(x, 4, search='minmax')
  flipped = {**state, 'step': -state['step']}
  np.testing.assert_array_equal(act.lsq_fake_quant(x, flipped, 4), act.lsq_fake_quant(x, state, 4))
  zero = {**state, 'step': jnp.float32(0.0)}
  assert np.isfinite(np.asarray(act.lsq_fake_quant(x, zero, 4))).all()


def _per_token_numpy(t, n_bits):
  """LRQ eval/.../SwapLinear.py quantize_activation_per_token_absmax, in numpy float32."""
  t_max = t.max(axis=-1, keepdims=True)
  t_min = t.min(axis=-1, keepdims=True)
  q_max = 2 ** n_bits - 1
  scales = np.maximum((t_max - t_min) / np.float32(q_max), np.float32(1e-8))
  zero_points = np.clip(np.round(-t_min / scales), 0, 2 ** n_bits - 1)
  return scales * np.clip(np.round(t / scales), -zero_points, 2 ** n_bits - 1 - zero_points)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from([(4, 16), (2, 3, 64), (1, 5)]),
       bits=st.sampled_from([4, 8]), shift=st.floats(-3, 3))
def test_per_token_equals_the_lrq_reference(seed, shape, bits, shift):
  x = _x(seed, shape, shift)
  x[..., 0] = shift   # rows that may be one-sided
  got = np.asarray(act.per_token_fake_quant(jnp.asarray(x), {}, bits))
  np.testing.assert_allclose(got, _per_token_numpy(x, bits), rtol=0, atol=1e-6 * (1 + np.abs(x).max()))
  # at most 2^bits levels per token
  for row in got.reshape(-1, shape[-1]):
    assert len(np.unique(row)) <= 2 ** bits


def test_per_token_is_straight_through():
  x = jnp.asarray(_x(4, (3, 10)))
  g = jax.grad(lambda v: jnp.sum(act.per_token_fake_quant(v, {}, 8)))(x)
  np.testing.assert_array_equal(g, 1.0)   # every element is inside its own row's range


def test_factories_describe_themselves_and_reject_bad_knobs():
  q = act.lsq(4)
  assert q.static and q.trainable == ('step',) and q.describe() == {'name': 'lsq', 'bits': 4, 'lr': 4e-5,
                                                                    'search': 'mse'}
  assert not act.per_token(8).static and act.per_token(8).optimizer is None
  for bad in (1, 17, 4.0, True, '8'):
    with pytest.raises(ValueError, match='activation bits'):
      act.lsq(bad)
  with pytest.raises(ValueError, match='lsq lr'):
    act.lsq(4, lr=-1.0)
  with pytest.raises(ValueError, match='search'):
    act.lsq(4, search='kl')
  with pytest.raises(ValueError, match='NaN'):
    act.lsq_calibrate(np.array([1.0, np.nan], np.float32), 4)
  with pytest.raises(ValueError, match='empty'):
    act.lsq_calibrate(np.zeros((0,), np.float32), 4)
  tx = q.optimizer(10)
  state = tx.init({'step': jnp.float32(1.0)})
  assert state is not None
