"""Activation quantization in the engine: quantizers at kernel inputs, calibration, joint training, rules, the
quantized model, resume."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexround_jax as fr
from flexround_jax.engine import graph
from flexround_jax.quantizers import activation as act

import tiny_models

lsq = act.lsq


def _config(**kw):
  base = dict(method='flexround', weight=fr.QuantSpec(bits=4), blocks=r'block_\d+', iters=60, batch_size=32,
              progress=False, activation=lsq(4), drop_prob=0.5)
  return fr.QuantConfig(**{**base, **kw})


def _held_out_mse(apply_fn, params, x, y_fp):
  return float(jnp.mean((apply_fn(params, x) - y_fp) ** 2))


def test_map_inputs_replaces_the_first_argument_of_the_named_modules_linen_and_nnx():
  for params, apply_fn, x in (tiny_models.mlp(), tiny_models.nnx_mlp()):
    x = x[:4]
    calls, _ = graph.trace_calls(apply_fn, params, x)
    dense = [c.path for c in calls if c.cls_name in ('Dense', 'Linear')]
    target = dense[1]
    seen = {}

    def zero(v):
      seen['shape'] = v.shape
      return jnp.zeros_like(v)
    with graph.map_inputs({target: zero}):
      calls_z, out_z = graph.trace_calls(apply_fn, params, x)
    assert seen
    call = next(c for c in calls_z if c.path == target)
    bias = np.asarray(call.output)   # zero input: the Dense layer returns its bias on every row
    np.testing.assert_allclose(bias, np.broadcast_to(bias[:1], bias.shape))
    assert not np.allclose(np.asarray(out_z), np.asarray(apply_fn(params, x)))
    np.testing.assert_array_equal(np.asarray(apply_fn(params, x)), np.asarray(graph.trace_calls(apply_fn, params,
                                                                                                  x)[1]))


def test_flexround_with_lsq_activations_learns_steps_that_beat_the_calibrated_ones_on_held_out_data():
  params, apply_fn, x = tiny_models.mlp()
  calib, held = x[:192], x[192:]
  y_held = apply_fn(params, held)
  # A tiny model and 100 steps: a larger step learning rate than QDrop's 4e-5 (20k steps on ImageNet models).
  cfg = _config(activation=lsq(4, lr=1e-2), iters=100)
  res = fr.quantize(params, apply_fn, calib, cfg)
  modules = {k.rsplit('/', 1)[0] for k in res.qtensors}
  assert set(res.activations) == modules               # every quantized kernel's input
  for q, state in res.activations.values():
    assert q.name == 'lsq' and np.float32(state['step']) > 0 and 0 <= int(state['zero_point']) <= 15
  # The calibrated (initial) steps, from the report of a run without training.
  rtn = fr.quantize(params, apply_fn, calib, dataclasses.replace(cfg, method='rtn'))
  for m, (q, st) in res.activations.items():
    assert float(st['step']) != float(rtn.activations[m][1]['step']) or m.startswith('Dense_0')
  quant_apply = res.apply_quantized(apply_fn)
  learned = _held_out_mse(quant_apply, res.params, held, y_held)
  calibrated = fr.QuantizeResult(params=res.params, qtensors=res.qtensors, report=[], plan=[], config=res.config,
                                 activations=rtn.activations)
  assert learned < _held_out_mse(calibrated.apply_quantized(apply_fn), res.params, held, y_held)
  # Activation quantization costs accuracy over weight-only, as it must.
  weight_only = fr.quantize(params, apply_fn, calib, dataclasses.replace(cfg, activation=None))
  assert weight_only.activations == {}
  assert _held_out_mse(apply_fn, weight_only.params, held, y_held) < learned


def test_report_and_final_loss_match_the_quantized_model_and_rules_set_bits_and_float_inputs():
  params, apply_fn, x = tiny_models.mlp()
  rules = (fr.Rule('Dense_0', activation='float'), fr.Rule('Dense_1', bits=8, activation=lsq(8)))
  res = fr.quantize(params, apply_fn, x, _config(rules=rules, iters=20))
  assert 'Dense_0' not in res.activations
  assert res.activations['Dense_1'][0].bits == 8
  assert res.activations['block_0/Dense_0'][0].bits == 4
  head = next(r for r in res.report if r['unit'] == 'Dense_1')
  assert head['activations']['Dense_1']['quantizer'] == {'name': 'lsq', 'bits': 8, 'lr': 4e-5, 'search': 'mse'}
  # The last unit's final loss is the quantized model's error on the calibration data (its inputs are the
  # quantized model's, its targets the float model's).
  out_q = res.apply_quantized(apply_fn)(res.params, x)
  out_fp = apply_fn(params, x)
  loss = float(jnp.mean(jnp.sum((out_q - out_fp) ** 2, axis=-1)))
  np.testing.assert_allclose(head['loss_final'], loss, rtol=1e-4)
  plan = {p['unit']: p for p in res.plan}
  assert plan['Dense_0']['activations'] == ['float'] and plan['Dense_1']['activations'] == [repr(lsq(8))]


def test_dynamic_per_token_inputs_on_nnx_and_a_resumed_run_restores_the_learned_steps(tmp_path):
  params, apply_fn, x = tiny_models.nnx_mlp()
  res = fr.quantize(params, apply_fn, x, _config(activation=act.per_token(8), iters=10, drop_prob=0.0))
  assert res.activations and all(q.name == 'per_token' and st == {} for q, st in res.activations.values())
  out_q = np.asarray(res.apply_quantized(apply_fn)(res.params, x))
  np.testing.assert_array_equal(out_q, np.asarray(act.quantized_apply(apply_fn, res.activations)(res.params, x)))
  assert not np.array_equal(out_q, np.asarray(apply_fn(res.params, x)))   # the inputs really are quantized
  # The last unit's final loss is that quantized model's (nnx units re-apply merged modules with their own paths).
  last = res.report[-1]
  y_fp = np.asarray(apply_fn(params, x))
  np.testing.assert_allclose(last['loss_final'], float(np.mean(np.sum((out_q - y_fp) ** 2, axis=-1))), rtol=1e-4)
  # Resume: stop after the first unit, rerun, compare with an uninterrupted run.
  params, apply_fn, x = tiny_models.mlp()
  cfg = _config(iters=20, checkpoint_dir=str(tmp_path / 'ckpt'))
  full = fr.quantize(params, apply_fn, x, dataclasses.replace(cfg, checkpoint_dir=None))
  calls = {'n': 0}
  from flexround_jax.engine import unit as unit_lib
  real = unit_lib.UnitReconstructor.reconstruct

  def stop_after_two(self, *a, **kw):
    calls['n'] += 1
    if calls['n'] > 2:
      raise KeyboardInterrupt
    return real(self, *a, **kw)
  unit_lib.UnitReconstructor.reconstruct = stop_after_two
  try:
    with pytest.raises(KeyboardInterrupt):
      fr.quantize(params, apply_fn, x, cfg)
  finally:
    unit_lib.UnitReconstructor.reconstruct = real
  resumed = fr.quantize(params, apply_fn, x, cfg)
  assert full.resumed_units == 0 and resumed.resumed_units == 2   # the two units the first call finished
  assert set(resumed.activations) == set(full.activations)
  for m, (q, st) in full.activations.items():
    assert np.float32(resumed.activations[m][1]['step']) == np.float32(st['step']), m
    assert int(resumed.activations[m][1]['zero_point']) == int(st['zero_point'])
  for name, qt in full.qtensors.items():
    np.testing.assert_array_equal(np.asarray(resumed.qtensors[name].codes), np.asarray(qt.codes))
  # Another activation setting is another run: the checkpoint refuses it.
  with pytest.raises(ValueError, match='fingerprint'):
    fr.quantize(params, apply_fn, x, dataclasses.replace(cfg, activation=lsq(3)))


def test_bad_activation_settings_are_named():
  with pytest.raises(ValueError, match='QuantConfig.activation'):
    fr.QuantConfig(activation='int4')
  with pytest.raises(ValueError, match='Rule .head. activation'):
    fr.Rule('head', activation={'name': 'lsq', 'bitz': 4})
  with pytest.raises(ValueError, match='skip=True'):
    fr.Rule('head', skip=True, activation='float')
  cfg = fr.QuantConfig.from_dict({'activation': {'name': 'lsq', 'bits': 2}, 'rules': [{'pattern': 'x',
                                                                                        'activation': 'float'}]})
  assert cfg.activation.bits == 2 and cfg.rules[0].activation == 'float'


def test_exports_carry_the_input_quantizers_and_reload_to_the_same_outputs(tmp_path):
  from flexround_jax import export
  params, apply_fn, x = tiny_models.mlp()
  rules = (fr.Rule('Dense_0', activation=act.per_token(8)),)
  res = fr.quantize(params, apply_fn, x, _config(iters=10, rules=rules))
  expected = np.asarray(res.apply_quantized(apply_fn)(res.params, x))
  st_path = str(tmp_path / 'model.safetensors')
  export.save_safetensors(st_path, res.params, res.qtensors, res.activations)
  export.save_orbax(str(tmp_path / 'orbax'), res)
  for path, load in ((st_path, export.load_safetensors), (str(tmp_path / 'orbax'), export.load_orbax)):
    p, _ = load(path)
    acts = export.load_activations(path)
    assert set(acts) == set(res.activations)
    assert acts['Dense_0'][0].name == 'per_token' and acts['Dense_0'][1] == {}
    got = np.asarray(act.quantized_apply(apply_fn, acts)(p, x))
    np.testing.assert_array_equal(got, expected)
  # A weight-only export has no input quantizers.
  export.save_safetensors(str(tmp_path / 'w.safetensors'), res.params, res.qtensors)
  assert export.load_activations(str(tmp_path / 'w.safetensors')) == {}
  # A stored step that is not a valid grid step is refused, naming the module.
  bad = dict(res.activations)
  q, st = bad['block_0/Dense_0']
  bad['block_0/Dense_0'] = (q, {**st, 'step': np.float32(-1.0)})
  with pytest.raises(ValueError, match="block_0/Dense_0.*step"):
    export.save_safetensors(str(tmp_path / 'bad.safetensors'), res.params, res.qtensors, bad)


def test_a_kernel_whose_input_is_not_a_positional_array_is_named_before_any_work():
  import flax.linen as nn

  class KwargDense(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, name='proj')(inputs=x)

  model = KwargDense()
  x = np.ones((8, 3), np.float32)
  params = model.init(jax.random.key(0), x)['params']
  apply_fn = lambda p, b: model.apply({'params': p}, b)
  with pytest.raises(ValueError, match="'proj' takes no array as its first positional argument"):
    fr.quantize(params, apply_fn, x, fr.QuantConfig(method='rtn', activation=lsq(4), progress=False))
  res = fr.quantize(params, apply_fn, x, fr.QuantConfig(method='rtn', activation=lsq(4), progress=False,
                                                        rules=(fr.Rule('proj', activation='float'),)))
  assert res.activations == {}
