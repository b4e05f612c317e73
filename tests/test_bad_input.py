"""Bad input fails before any work, with a ValueError that names what is wrong; a diverged unit is never kept."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flexround_jax as fr
from flexround_jax.engine import loop

import tiny_models

BLOCKS = r'block_\d+'


def _mlp(n=32):
  params, apply_fn, calib = tiny_models.mlp()
  return params, apply_fn, np.asarray(calib[:n])


def _config(**kw):
  return fr.QuantConfig(**{'blocks': BLOCKS, 'iters': 2, 'batch_size': 8, 'progress': False, **kw})


@pytest.fixture
def no_work(monkeypatch):
  """quantize may plan and validate, but fails the test if it starts reconstructing."""
  def run(*args, **kwargs):
    raise AssertionError('the run started working before the bad input was found')
  monkeypatch.setattr(loop, '_run', run)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize('leaf', ['kernel', 'bias'])
def test_nan_in_half_precision_params_is_found_up_front_naming_the_leaf(dtype, leaf, no_work):
  params, apply_fn, calib = _mlp()
  params = jax.tree.map(lambda a: a.astype(dtype), params)
  params['block_0']['Dense_1'][leaf] = params['block_0']['Dense_1'][leaf].at[0].set(jnp.nan)
  with pytest.raises(ValueError, match=rf"params contain NaN or Inf at \['block_0'\]\['Dense_1'\]\['{leaf}'\]"):
    fr.quantize(params, apply_fn, calib, _config(dry_run=True))


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize('value', [jnp.nan, jnp.inf])
def test_non_finite_half_precision_calibration_data_is_found_naming_the_leaf(dtype, value, no_work):
  params, apply_fn, calib = _mlp()
  batch = {'x': jnp.asarray(calib, dtype).at[3, 1].set(value)}
  with pytest.raises(ValueError, match=r"calib_data contains NaN or Inf at \['x'\]"):
    fr.quantize(params, lambda p, b: apply_fn(p, b['x']), batch, _config(dry_run=True))


def test_a_slash_inside_a_param_key_is_refused_before_work(no_work):
  """Flax accepts a module named 'a/b'; its kernel could not be named in the '/'-joined paths of the exports, so
  quantize refuses it up front instead of after the run (where the exporters would)."""
  params, apply_fn, calib = _mlp()
  params = dict(params)
  params['block/0'] = params.pop('block_0')
  renamed = lambda p, x: apply_fn({**{k: v for k, v in p.items() if k != 'block/0'}, 'block_0': p['block/0']}, x)
  with pytest.raises(ValueError, match=r"key 'block/0' .* holds '/'"):
    fr.quantize(params, renamed, calib, _config(dry_run=True))


class _NormedMLP(nn.Module):
  """Dense -> BatchNorm (running statistics) -> an MLP block -> Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=True)(nn.Dense(32)(x))
    return nn.Dense(4)(tiny_models.MLPBlock(32, name='block_0')(x))


@pytest.mark.parametrize('dry_run', [True, False])
def test_nan_in_batch_norm_statistics_closed_over_by_apply_fn_is_found_before_work(dry_run, no_work):
  # Params and calibration data are finite; the NaN comes from a variable apply_fn closes over. The run used to
  # finish with NaN losses and a NaN model, its warnings blaming the kernels.
  _, _, calib = _mlp()
  model = _NormedMLP()
  variables = model.init(jax.random.key(0), calib[:1])
  stats = jax.tree.map(lambda a: a.at[3].set(jnp.nan), variables['batch_stats'])
  apply_fn = lambda p, b: model.apply({'params': p, 'batch_stats': stats}, b)
  with pytest.raises(ValueError, match=r"the float model is not finite on the first 2 calibration sample\(s\): the "
                                       r"output of unit 'block_0' holds NaN or Inf, though params and calib_data are "
                                       r"finite; module 'BatchNorm_0' \(BatchNorm\) is the first whose output holds "
                                       r"NaN or Inf while its inputs are finite\. So the cause is an array closed over "
                                       r"by apply_fn \(e\.g\. BatchNorm statistics"):
    fr.quantize(variables['params'], apply_fn, calib, _config(dry_run=dry_run))


def test_nan_computed_by_apply_fn_outside_the_modules_is_found_before_work(no_work):
  params, apply_fn, calib = _mlp()
  shift = np.zeros(calib.shape[1], np.float32)
  shift[2] = np.nan                                # a normalisation constant closed over by apply_fn
  with pytest.raises(ValueError, match=r"output of unit 'Dense_0' holds NaN or Inf, .* the root module \(MLP\) "
                                       r"already gets NaN or Inf inputs: apply_fn computes them outside its Flax "
                                       r"modules"):
    fr.quantize(params, lambda p, b: apply_fn(p, b - shift), calib, _config())


def test_inf_in_the_model_output_alone_is_accepted():
  params, apply_fn, calib = _mlp()
  masked = lambda p, b: jnp.where(jnp.arange(10) < 5, apply_fn(p, b), -jnp.inf)   # masked logits, after every unit
  result = fr.quantize(params, masked, calib, _config(dry_run=True))
  assert [p['unit'] for p in result.plan] == ['Dense_0', 'block_0', 'block_1', 'Dense_1']


def test_kernel_near_float32_max_is_refused_naming_it(no_work):
  params, apply_fn, calib = _mlp()
  kernel = params['block_1']['Dense_0']['kernel']
  params['block_1']['Dense_0']['kernel'] = kernel.at[0, 0].set(3e38).at[1, 0].set(-3e38)   # step = 6e38 / 15: Inf
  for dry_run in (True, False):
    with pytest.raises(ValueError, match=r'kernel block_1/Dense_0/kernel: max \|w\| = 3e\+38 .*float32'):
      fr.quantize(params, apply_fn, calib, _config(dry_run=dry_run))


def test_huge_weights_whose_grid_is_finite_are_accepted():
  params, apply_fn, calib = _mlp()
  kernel = params['block_1']['Dense_0']['kernel']
  # Per channel each range is 1e38 wide: the steps (1e38 / 15) and the quantized weights are finite.
  params['block_1']['Dense_0']['kernel'] = kernel.at[0, 0].set(1e38).at[1, 1].set(-1e38)
  result = fr.quantize(params, apply_fn, calib, _config(dry_run=True))
  assert len(result.plan) == 4


@pytest.mark.parametrize('factory', [fr.methods.flexround, fr.methods.adaround,
                                     lambda **kw: fr.methods.lrq(rank=2, **kw)])
@pytest.mark.parametrize('lr', [math.inf, math.nan, -1e-3, '1e-3', True])
def test_learning_rates_must_be_finite_non_negative_numbers(factory, lr):
  with pytest.raises(ValueError, match=r'(flexround|adaround|lrq) lr must be a non-negative number'):
    factory(lr=lr)


@pytest.mark.parametrize('knobs, field', [
    ({'warmup': '0.2'}, 'adaround warmup'), ({'warmup': math.nan}, 'adaround warmup'),
    ({'beta': (math.inf, 2.0)}, 'adaround beta'), ({'beta': ('a', 'b')}, 'adaround beta'),
    ({'reg': math.nan}, 'adaround reg')])
def test_adaround_knobs_are_checked(knobs, field):
  with pytest.raises(ValueError, match=field):
    fr.methods.adaround(**knobs)


@pytest.mark.parametrize('field, value', [
    ('seed', -1), ('seed', 1.5), ('seed', '0'), ('seed', True),
    ('drop_prob', '0.5'), ('drop_prob', -0.1), ('drop_prob', 1.5), ('drop_prob', math.nan), ('drop_prob', True),
    ('iters', 2.0), ('iters', '10'), ('iters', -1), ('batch_size', 8.0), ('batch_size', '8'), ('batch_size', 0),
    ('eval_batch_size', 64.0), ('sample_shards', True), ('sample_shards', 3), ('num_devices', True),
    ('num_devices', 0), ('dry_run', 1), ('fallback_to_rtn', 'no'), ('progress', None), ('keep_states', 'yes')])
def test_quant_config_fields_are_checked_at_construction_naming_the_field(field, value):
  with pytest.raises(ValueError, match=rf'QuantConfig\.{field}'):
    fr.QuantConfig(**{field: value})
  with pytest.raises(ValueError, match=rf'QuantConfig\.{field}'):
    fr.QuantConfig.from_dict({field: value})


def test_zero_size_kernel_is_refused_at_planning_naming_it(no_work):

  class Model(nn.Module):

    @nn.compact
    def __call__(self, x):
      empty = nn.Dense(0, kernel_init=nn.initializers.zeros)(x)     # kernel (16, 0)
      return nn.Dense(4)(x) + empty.sum(-1, keepdims=True)

  model = Model()
  _, _, calib = _mlp()
  params = model.init(jax.random.key(0), calib[:1])['params']
  apply_fn = lambda p, b: model.apply({'params': p}, b)
  for dry_run in (True, False):
    with pytest.raises(ValueError, match=r"kernel Dense_0/kernel has shape \(16, 0\), with a zero-size axis.*"
                                         r"Rule\('Dense_0', skip=True\)"):
      fr.quantize(params, apply_fn, calib, fr.QuantConfig(iters=2, batch_size=8, progress=False, dry_run=dry_run))


@pytest.mark.parametrize('dry_run', [True, False])
def test_sample_shards_not_dividing_the_samples_fails_before_work(dry_run, no_work):
  params, apply_fn, calib = _mlp(32)
  with pytest.raises(ValueError, match=r'32 calibration samples .* 3 equal parts \(QuantConfig.sample_shards=3\)'):
    fr.quantize(params, apply_fn, calib, _config(batch_size=6, sample_shards=3, dry_run=dry_run))


@pytest.mark.parametrize('dry_run', [True, False])
def test_apply_fn_failing_at_the_real_batch_size_fails_before_work(dry_run, no_work):
  params, apply_fn, calib = _mlp(32)

  def small_batches_only(p, batch):
    assert batch.shape[0] <= 2, f'batch of {batch.shape[0]}'
    return apply_fn(p, batch)
  with pytest.raises(ValueError, match=r'apply_fn\(params, batch\) failed on a batch of 64 samples.*'
                                       r'eval_batch_size=64.*batch of 64'):
    fr.quantize(params, small_batches_only, calib, _config(dry_run=dry_run))


@pytest.mark.parametrize('dry_run', [True, False])
def test_a_block_failing_at_the_training_batch_size_fails_before_work(dry_run, no_work):

  class Picky(nn.Module):

    @nn.compact
    def __call__(self, x):
      assert x.shape[0] <= 8, f'{x.shape[0]} samples'
      return x + nn.Dense(x.shape[-1])(x)

  class Model(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(4)(Picky(name='block_0')(nn.Dense(8)(x)))

  model = Model()
  _, _, calib = _mlp(32)
  params = model.init(jax.random.key(0), calib[:1])['params']
  config = _config(batch_size=16, eval_batch_size=8, dry_run=dry_run)
  with pytest.raises(ValueError, match=r"unit 'block_0' failed on a minibatch of QuantConfig.batch_size=16 samples"):
    fr.quantize(params, lambda p, b: model.apply({'params': p}, b), calib, config)


@pytest.mark.parametrize('dry_run', [True, False])
def test_batch_size_larger_than_the_data_fails_in_a_dry_run_as_in_a_run(dry_run, no_work):
  params, apply_fn, calib = _mlp(4)
  with pytest.raises(ValueError, match=r'QuantConfig.batch_size=8 is larger than the 4 calibration samples'):
    fr.quantize(params, apply_fn, calib, _config(dry_run=dry_run))


def _diverging(method):
  """``method`` with a NaN learning rate: every trained entry is NaN after the first step."""
  return dataclasses.replace(method, optimizer=lambda iters: optax.sgd(math.nan))


def test_diverged_unit_without_fallback_is_an_error_and_finished_units_stay_checkpointed(tmp_path):
  from flexround_jax.engine import checkpoint
  params, apply_fn, calib = _mlp()
  config = _config(method='rtn', rules=[fr.Rule('Dense_1', method=_diverging(fr.methods.flexround()))],
                   fallback_to_rtn=False, checkpoint_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r'unit Dense_1: flexround ended with NaN or Inf in Dense_1/kernel'):
    fr.quantize(params, apply_fn, calib, config)
  assert checkpoint.describe(str(tmp_path))['completed'] == 3      # Dense_0, block_0, block_1


def test_diverged_unit_with_fallback_keeps_rtn_with_a_warning_and_a_report_entry():
  params, apply_fn, calib = _mlp()
  config = _config(method='rtn', rules=[fr.Rule('Dense_1', method=_diverging(fr.methods.flexround()))])
  with pytest.warns(UserWarning, match=r'unit Dense_1: flexround ended with NaN or Inf in Dense_1/kernel; '
                                       r'keeping RTN'):
    result = fr.quantize(params, apply_fn, calib, config)
  last = result.report[-1]
  assert last['fell_back_to_rtn'] and last['non_finite'] == ['Dense_1/kernel'] and np.isfinite(last['loss_final'])
  assert all('non_finite' not in r for r in result.report[:-1])
  assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree.leaves(result.params))
  assert all(np.isfinite(np.asarray(qt.scale)).all() for qt in result.qtensors.values())


def test_diverged_training_from_a_closed_form_start_keeps_the_start():
  params, apply_fn, calib = _mlp()
  config = _config(method='rtn', rules=[fr.Rule('Dense_1', method=_diverging(fr.methods.gptq_flexround()))],
                   keep_states=True)
  with pytest.warns(UserWarning, match=r'unit Dense_1: training ended with NaN or Inf in Dense_1/kernel; '
                                       r'keeping the start'):
    result = fr.quantize(params, apply_fn, calib, config)
  last = result.report[-1]
  assert last['kept_start'] and not last['fell_back_to_rtn'] and last['non_finite'] == ['Dense_1/kernel']
  assert last['loss_final'] == last['loss_start'] and np.isfinite(last['loss_final'])
  assert np.isfinite(np.asarray(result.states['Dense_1/kernel']['log_s1'])).all()


def test_runner_validates_the_quant_config_before_loading_the_model(tmp_path, monkeypatch):
  import os
  from flexround_jax import run, tasks

  def load(*args, **kwargs):
    raise AssertionError('the model was loaded before the config was validated')
  monkeypatch.setattr(tasks, 'make', load)
  config = run.load_config_file(os.path.join(os.path.dirname(__file__), '..', 'configs', 'toy_mlp.py'))
  config.quant.seed = -1
  with pytest.raises(ValueError, match=r'QuantConfig\.seed must be a non-negative integer, got -1'):
    run.run(config, str(tmp_path / 'work'))
  config.quant.seed = 0
  config.quant.drop_prob = 1.5
  with pytest.raises(ValueError, match=r'QuantConfig\.drop_prob'):
    run.run(config, str(tmp_path / 'work'))


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(['bfloat16', 'float16', 'float32', 'float64', 'float8_e4m3fn']),
       size=st.integers(0, 50), scale=st.sampled_from([1e-30, 1.0, 6e4, 1e38]),
       bad=st.sampled_from([None, 'nan', 'inf', '-inf']), chunk=st.sampled_from([1, 7, 1 << 22]),
       seed=st.integers(0, 2 ** 16))
def test_host_finite_and_peak_equals_numpy_in_float32(dtype, size, scale, bad, chunk, seed):
  """Host leaves (memory maps) are checked by their bits in chunks: the same answer as numpy in float32."""
  from flexround_jax.engine import plan
  dt = np.dtype(jnp.dtype(dtype))
  with np.errstate(over='ignore'):
    a = (np.random.default_rng(seed).standard_normal(size) * scale).astype(dt)
  if bad is not None and size and dtype != 'float8_e4m3fn':   # e4m3fn has no Inf (NaN only)
    a[size // 2] = float(bad)
  wide = a.astype(np.float64)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(plan, '_HOST_CHUNK', chunk)
    finite, peak = plan.host_finite_and_peak(a.reshape(-1, 1) if size % 2 else a)
  assert finite == bool(np.isfinite(wide).all())
  if finite:
    assert peak.dtype == np.float32 and peak == np.float32(np.abs(wide).max(initial=0.0))


@pytest.mark.parametrize('dtype', [jnp.bfloat16, np.float32])
def test_host_params_with_nan_or_a_huge_kernel_are_refused(dtype, no_work):
  """Params held as numpy arrays (as memory maps are) take the host path of both checks."""
  params, apply_fn, calib = _mlp()
  params = jax.tree.map(lambda a: np.asarray(a).astype(dtype), params)
  bad = jax.tree.map(np.copy, params)
  bad['block_0']['Dense_1']['bias'][1] = np.nan
  with pytest.raises(ValueError, match=r"params contain NaN or Inf at \['block_0'\]\['Dense_1'\]\['bias'\]"):
    fr.quantize(bad, apply_fn, calib, _config(dry_run=True))
  params['block_1']['Dense_0']['kernel'][0, 0] = 3e38
  params['block_1']['Dense_0']['kernel'][1, 0] = -3e38
  with pytest.raises(ValueError, match=r'kernel block_1/Dense_0/kernel: max \|w\| = 3(\.\d+)?e\+38 .*float32'):
    fr.quantize(params, apply_fn, calib, _config(dry_run=True))
