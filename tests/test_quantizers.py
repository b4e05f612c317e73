"""Quantizer math: RTN / AdaRound / FlexRound as in the reference (../shared/reference/flexround.md §1, §3, §8)."""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given

from flexround_jax import QTensor, QuantSpec
from flexround_jax import _layout
from flexround_jax.quantizers import adaround, flexround, rtn
from flexround_jax.quantizers import grid as grid_lib

# A fixed menu of shapes keeps jit compilations bounded: dense, conv, depthwise conv, grouped conv.
SHAPES = [(16, 8), (24, 12), (3, 3, 8, 16), (3, 3, 1, 12), (1, 1, 16, 8), (5, 5, 4, 8)]


@st.composite
def specs_and_kernels(draw):
  shape = draw(st.sampled_from(SHAPES))
  granularity = draw(st.sampled_from(['per_tensor', 'per_channel', 'per_group']))
  group_size = None
  if granularity == 'per_group':
    group_size = draw(st.sampled_from((1, 2, 4, 5, 8)))   # 5 (and 8 for 4 or 12 inputs): a shorter last group
  spec = QuantSpec(bits=draw(st.integers(2, 8)), granularity=granularity, group_size=group_size,
                   symmetric=draw(st.booleans()), grid_init=draw(st.sampled_from(['minmax', 'mse'])),
                   scale_dtype=draw(st.sampled_from(['float32', 'float16', 'bfloat16'])))
  seed = draw(st.integers(0, 2**16))
  scale = draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
  kernel = jax.random.normal(jax.random.key(seed), shape) * scale
  if draw(st.booleans()):  # heavy-tailed weights, as in real layers
    kernel = kernel * jnp.exp(jax.random.normal(jax.random.key(seed + 1), shape))
  return spec, kernel


def perturbed_flexround_state(kernel, spec, seed=0, amount=0.3):
  state = flexround.init(kernel, spec)
  keys = jax.random.split(jax.random.key(seed), 4)
  for key, name in zip(keys, flexround.TRAINABLE):
    if name in state:
      state[name] = state[name] + amount * jax.random.normal(key, state[name].shape)
  return state


@given(specs_and_kernels())
def test_codes_inside_integer_range(case):
  spec, kernel = case
  lo, hi = spec.code_range
  for method, state in [(rtn, rtn.init(kernel, spec)), (flexround, perturbed_flexround_state(kernel, spec)),
                        (adaround, adaround.init(kernel, spec))]:
    qt = method.finalize(kernel, state, spec)
    assert qt.codes.dtype == (np.int8 if spec.symmetric else np.uint8)
    assert qt.codes.shape == kernel.shape
    codes = np.asarray(qt.codes).astype(np.int32)
    assert codes.min() >= lo and codes.max() <= hi
    assert qt.scale.shape == _layout.grid_shape(kernel.shape, spec)
    assert np.all(np.asarray(qt.scale) > 0)
    zp = np.asarray(qt.zero_point)
    assert np.all((zp >= 0) & (zp <= hi)) and (not spec.symmetric or np.all(zp == 0))


@given(specs_and_kernels())
def test_flexround_at_init_equals_rtn_bit_for_bit(case):
  spec, kernel = case
  f_state, r_state = flexround.init(kernel, spec), rtn.init(kernel, spec)
  expected = rtn.fake_quant(kernel, r_state, spec)
  jit_fq = jax.jit(flexround.fake_quant, static_argnums=2)
  jit_rtn = jax.jit(rtn.fake_quant, static_argnums=2)
  np.testing.assert_array_equal(flexround.fake_quant(kernel, f_state, spec), expected)
  np.testing.assert_array_equal(jit_fq(kernel, f_state, spec), expected)
  np.testing.assert_array_equal(jit_rtn(kernel, r_state, spec), expected)
  np.testing.assert_array_equal(flexround.finalize(kernel, f_state, spec).codes,
                                rtn.finalize(kernel, r_state, spec).codes)


@given(specs_and_kernels())
def test_finalize_dequantize_equals_fake_quant_exactly(case):
  spec, kernel = case
  f_state = perturbed_flexround_state(kernel, spec)
  a_state = adaround.init(kernel, spec)
  a_state['v'] = a_state['v'] + jax.random.normal(jax.random.key(3), kernel.shape)
  r_state = rtn.init(kernel, spec)
  fq_jit = jax.jit(flexround.fake_quant, static_argnums=2)
  for got, want in [
      (flexround.finalize(kernel, f_state, spec), flexround.fake_quant(kernel, f_state, spec)),
      (flexround.finalize(kernel, f_state, spec), fq_jit(kernel, f_state, spec)),
      (adaround.finalize(kernel, a_state, spec), adaround.fake_quant(kernel, a_state, spec, hard=True)),
      (rtn.finalize(kernel, r_state, spec), rtn.fake_quant(kernel, r_state, spec)),
  ]:
    np.testing.assert_array_equal(got.dequantize(), want)


@given(specs_and_kernels())
def test_scales_are_exactly_representable_in_the_scale_dtype(case):
  """What a format stores (s1 in float16 / bfloat16) is the grid the method trained on, bit for bit."""
  spec, kernel = case
  dtype = jnp.dtype(spec.scale_dtype)
  for qt in (flexround.finalize(kernel, perturbed_flexround_state(kernel, spec), spec),
             rtn.finalize(kernel, rtn.init(kernel, spec), spec),
             adaround.finalize(kernel, adaround.init(kernel, spec), spec)):
    scale = np.asarray(qt.scale)
    assert scale.dtype == np.float32 and (scale > 0).all()
    np.testing.assert_array_equal(np.asarray(jnp.asarray(scale).astype(dtype).astype(jnp.float32)), scale)


def test_scale_dtype_rounds_the_step_with_a_straight_through_gradient():
  spec = QuantSpec(bits=4, granularity='per_channel', scale_dtype='float16')
  log_s1 = jnp.log(jnp.array([0.0123456, 1e-9, 3.14159]))
  s = grid_lib.step_size(log_s1, spec)
  np.testing.assert_array_equal(s, np.maximum(np.exp(np.asarray(log_s1)).astype(np.float16),
                                              np.finfo(np.float16).smallest_subnormal).astype(np.float32))
  grad = jax.grad(lambda t: grid_lib.step_size(t, spec).sum())(log_s1)
  np.testing.assert_allclose(grad, np.exp(np.asarray(log_s1)), rtol=1e-6)


@given(specs_and_kernels())
def test_mse_grid_never_worse_than_minmax(case):
  spec, kernel = case
  errors = {}
  for grid_init in ('minmax', 'mse'):
    s = spec.replace(grid_init=grid_init)
    w_hat = rtn.fake_quant(kernel, rtn.init(kernel, s), s)
    errors[grid_init] = _layout.reduce_to_grid(jnp.abs(w_hat - kernel) ** grid_lib.LP_NORM_P, s, jnp.mean)
  assert np.all(np.asarray(errors['mse']) <= np.asarray(errors['minmax']))


@given(specs_and_kernels())
def test_pack_unpack_round_trip(case):
  spec, kernel = case
  qt = flexround.finalize(kernel, perturbed_flexround_state(kernel, spec), spec)
  packed = qt.pack()
  assert packed.data.dtype == np.uint8
  assert packed.data.size == (kernel.size * spec.bits + 7) // 8
  back = QTensor.unpack(packed)
  np.testing.assert_array_equal(back.codes, qt.codes)
  assert back.codes.dtype == qt.codes.dtype
  np.testing.assert_array_equal(back.dequantize(), qt.dequantize())


def test_four_bit_codes_pack_two_per_byte():
  spec = QuantSpec(bits=4, granularity='per_tensor')
  qt = QTensor(codes=np.array([[1, 2], [15, 0]], np.uint8), scale=np.float32(1.0),
               zero_point=np.int32(0), spec=spec)
  np.testing.assert_array_equal(qt.pack().data, np.array([0x21, 0x0F], np.uint8))
  with pytest.raises(ValueError, match='packed data'):
    packed = qt.pack()
    QTensor.unpack(type(packed)(data=packed.data[:1], shape=packed.shape, scale=packed.scale,
                                zero_point=packed.zero_point, spec=spec))


def test_state_shapes_follow_flax_layouts():
  spec = QuantSpec(bits=4, granularity='per_channel')
  dense = flexround.init(jnp.ones((16, 8)) * jnp.arange(8), spec)
  chex.assert_shape([dense['log_s1'], dense['log_s3'], dense['zero_point']], (1, 8))
  chex.assert_shape(dense['log_s2'], (16, 8))
  assert 'log_s4' not in dense
  conv = flexround.init(jax.random.normal(jax.random.key(0), (3, 3, 4, 8)), spec)
  chex.assert_shape(conv['log_s4'], (1, 1, 4, 1))
  chex.assert_shape(conv['log_s3'], (1, 1, 1, 8))
  depthwise = flexround.init(jax.random.normal(jax.random.key(0), (3, 3, 1, 8)), spec)
  chex.assert_shape(depthwise['log_s4'], (1, 1, 1, 1))
  per_tensor = flexround.init(jax.random.normal(jax.random.key(0), (3, 3, 4, 8)), QuantSpec(4, 'per_tensor'))
  assert per_tensor['log_s1'].shape == ()
  grouped = rtn.init(jax.random.normal(jax.random.key(0), (32, 8)), QuantSpec(4, 'per_group', group_size=8))
  chex.assert_shape(grouped['scale'], (4, 8))


@pytest.mark.parametrize('method', [rtn, adaround, flexround])
def test_shorter_last_group_is_its_own_grid(method):
  # 10 inputs in groups of 4: rows 0-3, 4-7 and a last group of rows 8-9, each quantized as if alone.
  kernel = jax.random.normal(jax.random.key(3), (10, 6)) * jnp.linspace(0.1, 3.0, 10)[:, None]
  spec = QuantSpec(bits=3, granularity='per_group', group_size=4, grid_init='minmax')
  state = method.init(kernel, spec)
  chex.assert_shape(state['scale'] if 'scale' in state else state['log_s1'], (3, 6))
  w_hat = method.finalize(kernel, state, spec).dequantize()
  alone = QuantSpec(bits=3, granularity='per_channel', grid_init='minmax')
  parts = [rtn.finalize(kernel[a:b], rtn.init(kernel[a:b], alone), alone).dequantize()
           for a, b in ((0, 4), (4, 8), (8, 10))]
  if method is adaround:   # AdaRound's rounding starts at nearest only in probability; compare its grid
    np.testing.assert_allclose(state['scale'], jnp.concatenate(
        [rtn.init(kernel[a:b], alone)['scale'] for a, b in ((0, 4), (4, 8), (8, 10))]), rtol=1e-6)
  else:   # RTN and FlexRound at init are round-to-nearest on each group's own min/max grid
    np.testing.assert_array_equal(w_hat, jnp.concatenate(parts))


def test_symmetric_tie_is_exact_jitted_and_not():
  # max|w| / scale = (2^b - 1) / 2 is a rounding tie on a symmetric min/max grid.
  spec = QuantSpec(bits=4, granularity='per_channel', symmetric=True)
  kernel = jnp.array([[-0.75, 0.3], [0.2, -0.9], [0.75, 0.9], [0.1, 0.45]], jnp.float32)
  expected = rtn.fake_quant(kernel, rtn.init(kernel, spec), spec)
  state = flexround.init(kernel, spec)
  np.testing.assert_array_equal(jax.jit(flexround.fake_quant, static_argnums=2)(kernel, state, spec), expected)
  np.testing.assert_array_equal(flexround.fake_quant(kernel, state, spec), expected)


@pytest.mark.parametrize('shape', [(32, 16), (3, 3, 8, 16)])
def test_reciprocal_rule_gradient_at_init(shape):
  """d L / d log_s2 = -s1 W / S * dL/dW_hat for unclipped entries, 0 for clipped ones (Proposition 3.1)."""
  spec = QuantSpec(bits=3, granularity='per_channel', grid_init='mse')
  kernel = jax.random.normal(jax.random.key(0), shape)
  g = jax.random.normal(jax.random.key(1), shape)
  state = flexround.init(kernel, spec)
  trainable = {k: state[k] for k in flexround.TRAINABLE if k in state}

  def loss(t):
    return jnp.sum(flexround.fake_quant(kernel, {**state, **t}, spec) * g)

  grads = jax.grad(loss)(trainable)
  s1 = jnp.exp(state['log_s1'])
  x = kernel / s1
  lo, hi = grid_lib.integer_bounds(state['zero_point'], spec)
  inside = (jnp.round(x) >= lo) & (jnp.round(x) <= hi)
  assert 0 < int((~inside).sum()), 'the mse grid should clip some weights'
  np.testing.assert_allclose(grads['log_s2'], jnp.where(inside, -s1 * x * g, 0.0), rtol=1e-5, atol=1e-6)
  # s3 / s4 collect the same terms over their channels.
  np.testing.assert_allclose(grads['log_s3'], _layout.reduce_to_grid(grads['log_s2'], spec, jnp.sum),
                             rtol=1e-4, atol=1e-5)
  # d W_hat / d log_s1 = s1 (round(x) - x) in range (the divisor also holds s1), s1 * q_clamped outside.
  q = jnp.clip(jnp.round(x), lo, hi)
  d_s1 = jnp.where(inside, s1 * (q - x), s1 * q) * g
  np.testing.assert_allclose(grads['log_s1'], d_s1.sum(axis=tuple(range(len(shape) - 1)), keepdims=True),
                             rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(grads['log_s1']).max()) > 0


@given(specs_and_kernels(), st.sampled_from(['float32', 'bfloat16']))
def test_fused_grad_same_forward_and_gradient_as_autodiff(case, dtype):
  """``method(fused_grad=True)``: the forward is bit for bit the default's, the closed-form gradient is autodiff's
  up to float rounding (a different summation order), for every layout, granularity and kernel dtype."""
  spec, kernel = case
  kernel = kernel.astype(dtype)
  state = perturbed_flexround_state(kernel, spec, amount=0.2)
  g = jax.random.normal(jax.random.key(7), kernel.shape)
  trainable = {k: state[k] for k in flexround.TRAINABLE if k in state}
  fused = jax.jit(flexround.fake_quant_fused, static_argnums=2)
  np.testing.assert_array_equal(fused(kernel, state, spec), jax.jit(flexround.fake_quant, static_argnums=2)(
      kernel, state, spec))

  def grads(fake_quant):
    loss = lambda t: jnp.sum(fake_quant(kernel, {**state, **t}, spec).astype(jnp.float32) * g)
    return jax.jit(jax.grad(loss))(trainable)

  auto, closed = grads(flexround.fake_quant), grads(flexround.fake_quant_fused)
  for key in trainable:
    scale = float(jnp.abs(auto[key]).max()) + 1e-30
    np.testing.assert_allclose(closed[key] / scale, auto[key] / scale, rtol=0, atol=2e-5, err_msg=key)


def test_fused_grad_knob():
  assert flexround.method().hparams == {'lr': 3e-3, 'lr_s1': None}   # off: fingerprints of earlier runs unchanged
  assert flexround.method(fused_grad=True).hparams['fused_grad'] is True
  with pytest.raises(ValueError, match='fused_grad'):
    flexround.method(fused_grad='yes')


def test_clamp_passes_full_gradient_at_the_bounds():
  x = jnp.array([-9.2, -8.0, -7.6, 0.3, 6.6, 7.0, 7.4, 9.0])
  grad = jax.grad(lambda v: jnp.sum(grid_lib.clip_inclusive(grid_lib.round_ste(v), -8.0, 7.0)))(x)
  np.testing.assert_array_equal(grad, [0, 1, 1, 1, 1, 1, 1, 0])


def test_adaround_gradient_does_not_scale_with_weight_magnitude():
  spec = QuantSpec(bits=8, granularity='per_tensor', symmetric=True)
  base = jax.random.uniform(jax.random.key(0), (16, 8), minval=-1, maxval=1)
  kernel = base.at[0, 0].set(10.0)                # sets the step: s = 20 / 255
  state = adaround.init(kernel, spec)
  s = state['scale']
  shifted = kernel + jnp.sign(kernel) * 40 * s     # same fractional parts, larger weights
  shifted = shifted.at[0, 0].set(10.0)
  g = jax.random.normal(jax.random.key(1), kernel.shape)

  def grad_v(k):
    return jax.grad(lambda v: jnp.sum(adaround.fake_quant(k, {**state, 'v': v}, spec) * g))(state['v'])

  def grad_s2(k):
    fs = flexround.init(kernel, spec)
    return jax.grad(lambda t: jnp.sum(flexround.fake_quant(k, {**fs, 'log_s2': t}, spec) * g))(fs['log_s2'])

  np.testing.assert_allclose(grad_v(kernel), grad_v(shifted), rtol=1e-3, atol=1e-6)
  assert float(jnp.abs(grad_s2(shifted)).sum()) > 5 * float(jnp.abs(grad_s2(kernel)).sum())


def test_adaround_soft_start_reproduces_in_range_weights():
  spec = QuantSpec(bits=4, granularity='per_channel', symmetric=False)
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 8, 16))
  state = adaround.init(kernel, spec)
  soft = adaround.fake_quant(kernel, state, spec)
  x = kernel / _layout.expand(state['scale'], spec, kernel.shape[-2])
  lo, hi = grid_lib.integer_bounds(state['zero_point'], spec)
  inside = (x >= lo) & (x <= hi)
  np.testing.assert_allclose(jnp.where(inside, soft, kernel), kernel, atol=1e-5)
  assert float(adaround.regularizer(state, 2.0)) > 0
  hard = adaround.finalize(kernel, state, spec).codes.astype(jnp.int32) - state['zero_point']
  assert set(np.unique(np.asarray(hard - jnp.floor(x)))) <= {-1, 0, 1}


def _layer_problem(seed=0, n=512, d_in=64, d_out=32):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  # Correlated inputs: a rank-4 signal plus a little noise (white inputs make RTN optimal for the output error).
  x = jax.random.normal(k1, (n, 4)) @ jax.random.normal(k2, (4, d_in)) + 0.1 * jax.random.normal(k3, (n, d_in))
  w = jax.random.normal(k4, (d_in, d_out)) / np.sqrt(d_in)
  return x, w


def _output_error(x, w, w_hat):
  return float(jnp.mean(jnp.sum((x @ w_hat - x @ w) ** 2, axis=-1)))


def test_layerwise_reconstruction_beats_rtn_at_3_bits():
  x, w = _layer_problem()
  spec = QuantSpec(bits=3, granularity='per_channel', grid_init='mse')
  rtn_err = _output_error(x, w, rtn.fake_quant(w, rtn.init(w, spec), spec))
  iters = 400

  # FlexRound: Adam + cosine decay on the log scales, output MSE only.
  state = flexround.init(w, spec)
  params = {k: state[k] for k in flexround.TRAINABLE if k in state}
  opt = optax.adam(optax.cosine_decay_schedule(3e-3, iters))
  opt_state = opt.init(params)

  @jax.jit
  def f_step(params, opt_state):
    loss_fn = lambda p: _output_error_traced(x, w, flexround.fake_quant(w, {**state, **p}, spec))  # noqa: E731
    loss, g = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(g, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  for _ in range(iters):
    params, opt_state, _ = f_step(params, opt_state)
  f_err = _output_error(x, w, flexround.finalize(w, {**state, **params}, spec).dequantize())

  # AdaRound: soft rounding with the annealed regulariser, hard at the end.
  a_state = adaround.init(w, spec)
  v, a_opt = a_state['v'], optax.adam(1e-2)
  a_opt_state = a_opt.init(v)

  @jax.jit
  def a_step(v, a_opt_state, beta, lam):
    def loss(v):
      st_ = {**a_state, 'v': v}
      return _output_error_traced(x, w, adaround.fake_quant(w, st_, spec)) + lam * adaround.regularizer(st_, beta)
    l, g = jax.value_and_grad(loss)(v)
    updates, a_opt_state = a_opt.update(g, a_opt_state)
    return optax.apply_updates(v, updates), a_opt_state, l

  warmup = int(0.2 * iters)
  for i in range(iters):
    rel = max(0.0, (i - warmup) / (iters - warmup))
    beta, lam = 20.0 - rel * 18.0, (0.0 if i < warmup else 0.01)
    v, a_opt_state, _ = a_step(v, a_opt_state, beta, lam)
  a_err = _output_error(x, w, adaround.finalize(w, {**a_state, 'v': v}, spec).dequantize())

  assert f_err < 0.8 * rtn_err, (f_err, rtn_err)
  assert a_err < 0.8 * rtn_err, (a_err, rtn_err)


def _output_error_traced(x, w, w_hat):
  return jnp.mean(jnp.sum((x @ w_hat - x @ w) ** 2, axis=-1))


@pytest.mark.parametrize('kwargs, match', [
    (dict(bits=1), 'bits'), (dict(bits=9), 'bits'), (dict(bits=4.0), 'bits'),
    (dict(granularity='per_row'), 'granularity'), (dict(granularity='per_group'), 'group_size'),
    (dict(granularity='per_group', group_size=0), 'group_size'), (dict(grid_init='percentile'), 'grid_init'),
    (dict(group_size=8), 'group_size'), (dict(narrow_range=1), 'narrow_range must be a bool'),
    (dict(narrow_range=True), 'narrow_range=True needs symmetric=True'),
])
def test_bad_spec_is_a_clear_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    QuantSpec(**kwargs)


@pytest.mark.parametrize('method', [rtn, adaround, flexround])
def test_bad_kernel_is_a_clear_error(method):
  spec = QuantSpec(bits=4)
  with pytest.raises(ValueError, match='floating-point'):
    method.init(jnp.ones((4, 4), jnp.int32), spec)
  with pytest.raises(ValueError, match='NaN or Inf'):
    method.init(jnp.ones((4, 4)).at[0, 0].set(jnp.nan), spec)
  with pytest.raises(ValueError, match='NaN or Inf'):
    method.init(jnp.ones((4, 4)).at[1, 0].set(jnp.inf), spec)
  with pytest.raises(ValueError, match='rank'):
    method.init(jnp.ones((4,)), spec)
  kernel = jax.random.normal(jax.random.key(0), (8, 4))
  state = method.init(kernel, spec)
  with pytest.raises(ValueError, match='shape'):
    method.fake_quant(jnp.ones((8, 5)), state, spec)
  with pytest.raises(ValueError, match='keys'):
    method.finalize(kernel, {}, spec)


@pytest.mark.parametrize('method', [rtn, adaround, flexround])
def test_narrow_range_grid_is_symmetric_about_zero(method):
  """narrow_range (Q8_0's int8 grid): codes in [-127, 127], step max|w| / 127; the full range puts -max|w| on -128."""
  kernel = jax.random.normal(jax.random.key(0), (64, 8))
  kernel = kernel.at[0].set(-jnp.abs(kernel).max(0) - 0.5)     # each channel's largest |w| is negative
  narrow = QuantSpec(bits=8, granularity='per_channel', symmetric=True, narrow_range=True)
  assert narrow.code_range == (-127, 127)
  qt = method.finalize(kernel, method.init(kernel, narrow), narrow)
  codes = np.asarray(qt.codes)
  np.testing.assert_array_equal(codes[0], -127)
  assert codes.min() == -127 and codes.max() <= 127
  np.testing.assert_allclose(np.asarray(qt.scale)[0], np.abs(np.asarray(kernel)).max(0) / 127, rtol=1e-6)
  full = narrow.replace(narrow_range=False)
  assert np.asarray(method.finalize(kernel, method.init(kernel, full), full).codes).min() == -128
