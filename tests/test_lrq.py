"""LRQ (FlexRound with a low-rank S2; ../shared/reference/flexround.md §1.10): RTN at init, finalize == fake_quant,
gradients to every factor, and a layer-wise fit that beats RTN."""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

from flexround_jax import QuantSpec
from flexround_jax.quantizers import lrq, rtn

# A fixed menu of Dense shapes (in, out) and ranks keeps jit compilations bounded; 12 inputs with groups of 5 or 8
# and 7 with groups of 4 or 5 give a shorter last group. Every example compiles, so fewer than the profile's 25.
SHAPES = [(16, 8), (12, 20), (7, 5)]
EXAMPLES = settings(max_examples=12)


@st.composite
def specs_kernels_ranks(draw):
  shape = draw(st.sampled_from(SHAPES))
  granularity = draw(st.sampled_from(['per_tensor', 'per_channel', 'per_group']))
  group_size = draw(st.sampled_from((1, 4, 5, 8))) if granularity == 'per_group' else None
  spec = QuantSpec(bits=draw(st.integers(2, 8)), granularity=granularity, group_size=group_size,
                   symmetric=draw(st.booleans()), grid_init=draw(st.sampled_from(['minmax', 'mse'])))
  seed = draw(st.integers(0, 2**16))
  kernel = jax.random.normal(jax.random.key(seed), shape) * draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
  if draw(st.booleans()):  # heavy-tailed weights, as in real layers
    kernel = kernel * jnp.exp(jax.random.normal(jax.random.key(seed + 1), shape))
  rank = draw(st.sampled_from([1, 2, min(shape) - 1]))
  return spec, kernel, rank


def perturbed_state(state, seed=0, amount=0.3):
  """Every trainable entry moved by a random amount (lrq_l too, so the low-rank product is non-zero).

  numpy draws: eager jax.random would compile anew for every shape.
  """
  rng = np.random.default_rng(seed)
  return {**state, **{k: jnp.asarray(np.asarray(state[k]) + amount * rng.standard_normal(np.shape(state[k])),
                                     jnp.float32) for k in lrq.TRAINABLE}}


# Eager and jitted calls give the same numbers (pinned below on fixed cases); the properties run jitted, one
# compilation per example, since eager dispatch compiles every primitive anew for each spec and shape.
@functools.partial(jax.jit, static_argnums=3)
def _lrq_and_rtn(kernel, state, r_state, spec):
  """(fake_quant, finalize) of LRQ and of RTN."""
  return ((lrq.fake_quant(kernel, state, spec), lrq.finalize(kernel, state, spec)),
          (rtn.fake_quant(kernel, r_state, spec), rtn.finalize(kernel, r_state, spec)))


@functools.partial(jax.jit, static_argnums=2)
def _fake_quant_and_finalize(kernel, state, spec):
  return lrq.fake_quant(kernel, state, spec), lrq.finalize(kernel, state, spec)


@EXAMPLES
@given(specs_kernels_ranks())
def test_at_init_equals_rtn_bit_for_bit(case):
  spec, kernel, rank = case
  state = lrq.init(kernel, spec, rank=rank)
  assert state['lrq_u'].shape == (kernel.shape[0], rank) and float(jnp.abs(state['lrq_u']).max()) > 0
  (k_hat, qt), (r_k_hat, r_qt) = _lrq_and_rtn(kernel, state, rtn.init(kernel, spec), spec)
  np.testing.assert_array_equal(k_hat, r_k_hat)
  np.testing.assert_array_equal(qt.codes, r_qt.codes)
  np.testing.assert_array_equal(qt.scale, r_qt.scale)
  np.testing.assert_array_equal(qt.zero_point, r_qt.zero_point)


@EXAMPLES
@given(specs_kernels_ranks())
def test_finalize_equals_fake_quant_and_codes_in_range(case):
  spec, kernel, rank = case
  at_init = lrq.init(kernel, spec, rank=rank)
  state = perturbed_state(at_init)
  k_hat, qt = _fake_quant_and_finalize(kernel, state, spec)
  np.testing.assert_array_equal(qt.dequantize(), k_hat)
  lo, hi = spec.code_range
  codes = np.asarray(qt.codes).astype(np.int32)
  assert qt.codes.dtype == (np.int8 if spec.symmetric else np.uint8) and qt.codes.shape == kernel.shape
  assert codes.min() >= lo and codes.max() <= hi
  np.testing.assert_array_equal(qt.zero_point, at_init['zero_point'])
  np.testing.assert_allclose(qt.scale, np.exp(np.asarray(state['log_s1'])), rtol=1e-6)   # the learned s1 is deployed


@pytest.mark.parametrize('spec', [QuantSpec(bits=4), QuantSpec(bits=3, granularity='per_group', group_size=8),
                                  QuantSpec(bits=8, granularity='per_tensor', symmetric=True, grid_init='mse')])
def test_eager_and_jitted_agree_at_init_and_perturbed(spec):
  kernel = jax.random.normal(jax.random.key(3), (20, 12)) * jnp.exp(jax.random.normal(jax.random.key(4), (20, 12)))
  at_init = lrq.init(kernel, spec, rank=3)
  expected = rtn.fake_quant(kernel, rtn.init(kernel, spec), spec)
  np.testing.assert_array_equal(lrq.fake_quant(kernel, at_init, spec), expected)
  np.testing.assert_array_equal(_fake_quant_and_finalize(kernel, at_init, spec)[0], expected)
  perturbed = perturbed_state(at_init)
  expected = lrq.finalize(kernel, perturbed, spec).dequantize()
  np.testing.assert_array_equal(lrq.fake_quant(kernel, perturbed, spec), expected)
  k_hat, qt = _fake_quant_and_finalize(kernel, perturbed, spec)
  np.testing.assert_array_equal(k_hat, expected)
  np.testing.assert_array_equal(qt.codes, lrq.finalize(kernel, perturbed, spec).codes)


def test_init_is_deterministic_kaiming_uniform():
  spec = QuantSpec(bits=4)
  kernel = jax.random.normal(jax.random.key(0), (64, 32))
  a, b = lrq.init(kernel, spec, rank=8), lrq.init(kernel, spec, rank=8)
  np.testing.assert_array_equal(a['lrq_u'], b['lrq_u'])
  assert not np.array_equal(a['lrq_u'], lrq.init(kernel, spec, rank=8, seed=1)['lrq_u'])
  u = np.asarray(a['lrq_u'])
  assert np.abs(u).max() <= 1 / np.sqrt(64) and np.abs(u).max() > 0.9 / np.sqrt(64)   # uniform(+-1/sqrt(in))
  assert {k: v.shape for k, v in a.items()} == {'log_s1': (1, 32), 'zero_point': (1, 32), 'lrq_u': (64, 8),
                                                 'lrq_l': (8, 32), 'log_r': (1, 32), 'log_c': (64, 1)}
  for name in ('lrq_l', 'log_r', 'log_c'):
    assert not np.any(np.asarray(a[name]))


def _regression_loss(trainable, state, kernel, spec):
  """A random regression loss on the fake-quantized kernel (in, out), as a function of the trainable entries."""
  x = jax.random.normal(jax.random.key(1), (64, kernel.shape[0]))
  y = x @ kernel + 0.1 * jax.random.normal(jax.random.key(2), (64, kernel.shape[1]))
  return jnp.mean((x @ lrq.fake_quant(kernel, {**state, **trainable}, spec) - y) ** 2)


_eager_grads = jax.grad(_regression_loss)
_jitted_grads = jax.jit(_eager_grads, static_argnums=3)


@pytest.mark.parametrize('spec', [QuantSpec(bits=3), QuantSpec(bits=4, granularity='per_group', group_size=8),
                                  QuantSpec(bits=4, granularity='per_tensor', symmetric=True)])
def test_every_trainable_entry_gets_a_gradient(spec):
  kernel = jax.random.normal(jax.random.key(0), (20, 12))
  state = lrq.init(kernel, spec, rank=3)
  trainable = {k: state[k] for k in lrq.TRAINABLE}
  grads = _jitted_grads(trainable, state, kernel, spec)
  np.testing.assert_array_equal(grads['lrq_u'], 0.0)   # lrq_l = 0 at init, and dLoss/dU = G L^T
  for name in ('log_s1', 'lrq_l', 'log_r', 'log_c'):
    assert float(jnp.abs(grads[name]).max()) > 0, name

  # One Adam step moves lrq_l; from there lrq_u gets a gradient too, and jit agrees with eager.
  opt = lrq.method(rank=3, lr=1e-2).optimizer(10)
  updates, _ = opt.update([grads], opt.init([trainable]))
  trainable = optax.apply_updates([trainable], updates)[0]
  assert float(jnp.abs(trainable['lrq_l']).max()) > 0
  eager, jitted = _eager_grads(trainable, state, kernel, spec), _jitted_grads(trainable, state, kernel, spec)
  for name in lrq.TRAINABLE:
    assert eager[name].shape == state[name].shape
    assert float(jnp.abs(eager[name]).max()) > 0, name
    np.testing.assert_allclose(jitted[name], eager[name], rtol=1e-4, atol=1e-6)


def test_layerwise_fit_beats_rtn():
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  # Correlated inputs: a rank-4 signal plus a little noise (white inputs make RTN optimal for the output error).
  x = jax.random.normal(k1, (512, 4)) @ jax.random.normal(k2, (4, 64)) + 0.1 * jax.random.normal(k3, (512, 64))
  w = jax.random.normal(k4, (64, 32)) / np.sqrt(64)
  spec = QuantSpec(bits=3, granularity='per_channel', grid_init='mse')
  iters = 200
  method = lrq.method(rank=4, lr=1e-2)
  state = method.init(w, spec)
  trainable, frozen = method.split(state)
  opt = method.optimizer(iters)
  opt_state = opt.init([trainable])

  def err(w_hat):
    return jnp.mean(jnp.sum((x @ w_hat - x @ w) ** 2, axis=-1))

  @jax.jit
  def step(params, opt_state, i):
    loss, g = jax.value_and_grad(lambda p: err(method.fake_quant(w, {**frozen, **p[0]}, spec, i, iters)))(params)
    updates, opt_state = opt.update(g, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  params = [trainable]
  for i in range(iters):
    params, opt_state, _ = step(params, opt_state, jnp.int32(i))
  rtn_err = float(err(rtn.fake_quant(w, rtn.init(w, spec), spec)))
  lrq_err = float(err(method.finalize(w, {**frozen, **params[0]}, spec).dequantize()))
  assert lrq_err < 0.5 * rtn_err, (lrq_err, rtn_err)   # 0.67 against 2.99 when written


def test_lr_s1_gets_its_own_rate():
  kernel = jax.random.normal(jax.random.key(0), (16, 8))
  spec = QuantSpec(bits=4)
  method = lrq.method(rank=2, lr=0.0, lr_s1=1e-2)
  trainable, _ = method.split(method.init(kernel, spec))
  grads = [jax.tree.map(jnp.ones_like, trainable)]
  opt = method.optimizer(10)
  updates, _ = opt.update(grads, opt.init([trainable]))
  assert float(jnp.abs(updates[0]['log_s1']).max()) > 0
  for name in ('lrq_u', 'lrq_l', 'log_r', 'log_c'):
    np.testing.assert_array_equal(updates[0][name], 0.0)
  assert method.describe() == {'name': 'lrq', 'rank': 2, 'lr': 0.0, 'lr_s1': 1e-2, 'seed': 0}


def test_bad_kernels_and_knobs_are_clear_errors():
  spec = QuantSpec(bits=4)
  with pytest.raises(ValueError, match=r'Dense kernels.*\(3, 3, 8, 16\)'):
    lrq.init(np.ones((3, 3, 8, 16), np.float32), spec, rank=2)
  with pytest.raises(ValueError, match='saves nothing'):
    lrq.init(jnp.ones((16, 8)), spec, rank=8)
  with pytest.raises(ValueError, match='saves nothing'):
    lrq.method(rank=8).init(jnp.ones((16, 8)), spec)
  kernel = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
  state = lrq.init(kernel, spec, rank=2)
  with pytest.raises(ValueError, match='lrq_l'):
    lrq.fake_quant(kernel, {**state, 'lrq_l': jnp.zeros((3, 8))}, spec)
  for kwargs, knob in [(dict(rank=0), 'rank'), (dict(rank=2.0), 'rank'), (dict(rank=True), 'rank'),
                       (dict(rank=2, lr=-1.0), 'lr'), (dict(rank=2, lr_s1=-1e-3), 'lr_s1'),
                       (dict(rank=2, seed=0.5), 'seed')]:
    with pytest.raises(ValueError, match=knob):
      lrq.method(**kwargs)
