"""A resumed run is the run that was asked for (the fingerprint), and a block never trains on guessed inputs."""

import dataclasses
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexround_jax as fr
from flexround_jax.engine import activations, checkpoint
from flexround_jax.engine import config as config_lib
from flexround_jax.engine import plan as plan_lib

import tiny_models

# A changed value for every QuantConfig field. A new field without an entry fails the walk below: decide whether it
# changes results (then the fingerprint must see it) or not (then list it in config.RESULT_NEUTRAL).
CHANGED = {
    'method': fr.methods.flexround(lr=1e-3),
    'weight': fr.QuantSpec(bits=3, granularity='per_channel'),
    'rules': (fr.Rule(r'block_0/.*', bits=8),),
    'blocks': r'block_\d+',
    'iters': 7,
    'batch_size': 8,
    'drop_prob': 0.5,
    'seed': 3,
    'checkpoint_dir': '/elsewhere',
    'log_dir': '/logs',
    'dry_run': True,
    'num_devices': 2,
    'model_devices': 2,
    'spill_dir': '/spill',
    'fallback_to_rtn': False,
    'progress': False,
    'eval_batch_size': 32,
    'sample_shards': 2,
    'keep_states': True,
    'activation': fr.quantizers.activation.lsq(4),
    'act_calib_samples': 64,
    'weight_params': (fr.WeightParam(r'block_0/.*', 'w'),),
    'compute_dtype': 'bfloat16',
    'fallback_samples': 16,
    'cache_dtype': 'bfloat16',
}


def _fp(config, tree=None, calib=None, digest='model', devices=1):
  tree = {'w': np.ones((4, 4), np.float32)} if tree is None else tree
  calib = np.zeros((8, 4), np.float32) if calib is None else calib
  return checkpoint.fingerprint(tree, calib, config, digest, devices)


def test_every_config_field_is_fingerprinted_or_declared_result_neutral():
  fields = {f.name for f in dataclasses.fields(fr.QuantConfig)}
  when_set = {k: CHANGED[k] for k in config_lib.FINGERPRINTED_WHEN_SET}
  fingerprinted = set(fr.QuantConfig(activation='lsq', **when_set).fingerprint_fields())
  elsewhere = set(config_lib.FINGERPRINTED_ELSEWHERE)
  assert fingerprinted | config_lib.RESULT_NEUTRAL | elsewhere == fields
  assert not fingerprinted & config_lib.RESULT_NEUTRAL and not fingerprinted & elsewhere
  assert set(CHANGED) == fields, f'give new fields a changed value here: {sorted(fields - set(CHANGED))}'
  base = fr.QuantConfig(blocks=r'block_1')
  for name, value in CHANGED.items():
    if name == 'act_calib_samples':   # fingerprinted when activations are quantized (see the next test)
      base = dataclasses.replace(base, activation=fr.quantizers.activation.lsq(4))
    changed = dataclasses.replace(base, **{name: value})
    if name in config_lib.RESULT_NEUTRAL or name in elsewhere:
      assert _fp(changed) == _fp(base), name
    else:
      assert _fp(changed) != _fp(base), name


def test_activation_fields_are_fingerprinted_only_when_activations_are_quantized():
  weight_only = fr.QuantConfig(rules=(fr.Rule('head', bits=8),))
  fields = weight_only.fingerprint_fields()
  assert 'activation' not in fields and 'act_calib_samples' not in fields
  assert 'activation' not in fields['rules'][0]   # weight-only fingerprints are those of runs before the fields
  assert _fp(weight_only) == _fp(dataclasses.replace(weight_only, act_calib_samples=5))
  lsq = fr.quantizers.activation.lsq
  a4 = dataclasses.replace(weight_only, activation=lsq(4))
  assert _fp(a4) != _fp(weight_only)
  assert _fp(a4) != _fp(dataclasses.replace(a4, activation=lsq(4, lr=1e-4)))
  assert _fp(a4) != _fp(dataclasses.replace(a4, act_calib_samples=5))
  assert _fp(a4) != _fp(dataclasses.replace(a4, rules=(fr.Rule('head', bits=8, activation=lsq(8)),)))
  assert _fp(a4) != _fp(dataclasses.replace(a4, rules=(fr.Rule('head', bits=8, activation='float'),)))


def test_rule_order_eval_batch_size_knobs_devices_and_model_are_in_the_fingerprint():
  rules = (fr.Rule(r'block_0/.*', bits=2), fr.Rule(r'block_.*', bits=8))
  a = fr.QuantConfig(rules=rules)
  assert _fp(a) != _fp(dataclasses.replace(a, rules=rules[::-1]))   # first match wins: order changes the bits
  assert _fp(a) != _fp(dataclasses.replace(a, eval_batch_size=63))
  assert _fp(a) != _fp(dataclasses.replace(a, method=fr.methods.flexround(lr_s1=1e-4)))
  assert _fp(a) != _fp(a, devices=2)
  assert _fp(a) != _fp(a, digest='another model')


def _digest(apply_fn, params, x):
  return checkpoint.model_digest(apply_fn, params, x[:1])


def test_model_digest_sees_a_changed_function_and_closed_over_constants():
  params, apply_fn, x = tiny_models.mlp()
  base = _digest(apply_fn, params, x)
  assert base == _digest(apply_fn, params, x)
  assert base == _digest(apply_fn, jax.tree.map(lambda a: a + 1, params), x)   # params are fingerprinted apart
  assert base != _digest(lambda p, b: apply_fn(p, b) * 2, params, x)
  assert base != _digest(lambda p, b: apply_fn(p, jnp.clip(b, -3, 3)), params, x)
  table = jnp.arange(16.0)
  other = table.at[3].set(0.0)
  assert _digest(lambda p, b: apply_fn(p, b + table), params, x) != _digest(lambda p, b: apply_fn(p, b + other),
                                                                            params, x)


_SCRIPT = """
import sys; sys.path.insert(0, {tests!r})
import tiny_models
from flexround_jax.engine import checkpoint
params, apply_fn, x = tiny_models.{model}()
probe = {{k: v[:1] for k, v in x.items()}} if isinstance(x, dict) else x[:1]
print(checkpoint.model_digest(apply_fn, params, probe))
"""


@pytest.mark.parametrize('model', ['transformer', 'nnx_mlp'])
def test_model_digest_is_stable_across_processes(model):
  import os  # pylint: disable=g-import-not-at-top
  tests = os.path.dirname(__file__)
  outs = [subprocess.run([sys.executable, '-c', _SCRIPT.format(tests=tests, model=model)], capture_output=True,
                         text=True, check=True).stdout.strip() for _ in range(2)]
  assert outs[0] == outs[1] and len(outs[0]) == 64


def test_resuming_with_a_changed_apply_fn_is_an_error(tmp_path):
  params, apply_fn, calib = tiny_models.mlp()
  cfg = fr.QuantConfig(blocks=r'block_\d+', iters=3, batch_size=16, progress=False, checkpoint_dir=str(tmp_path))
  fr.quantize(params, apply_fn, calib, cfg)
  with pytest.raises(ValueError, match='different config'):
    fr.quantize(params, lambda p, b: apply_fn(p, b * 0.5), calib, cfg)
  with pytest.raises(ValueError, match='different config'):
    fr.quantize(params, apply_fn, calib, dataclasses.replace(cfg, eval_batch_size=32))


def test_dry_run_checks_an_existing_checkpoint_like_the_run(tmp_path, capsys):
  params, apply_fn, calib = tiny_models.mlp()
  cfg = fr.QuantConfig(blocks=r'block_\d+', iters=3, batch_size=16, progress=False, checkpoint_dir=str(tmp_path))
  fr.quantize(params, apply_fn, calib, cfg)
  fr.quantize(params, apply_fn, calib, dataclasses.replace(cfg, dry_run=True))
  assert 'this run resumes after 4 of 4 units' in capsys.readouterr().out
  with pytest.raises(ValueError, match='different config'):
    fr.quantize(params, apply_fn, calib, dataclasses.replace(cfg, dry_run=True, iters=4))
  fresh = tmp_path / 'fresh'
  fr.quantize(params, apply_fn, calib, dataclasses.replace(cfg, dry_run=True, checkpoint_dir=str(fresh)))
  assert not fresh.exists()     # a dry run writes nothing


# ------------------------------------------------------------------------------------------ chains from the program


class MaskedMLP(nn.Module):
  """Blocks with a padding mask applied between them: on the first samples (nothing padded) the mask is the
  identity, so equal values on probe samples would wrongly call block_1's input block_0's output."""

  mask_between: bool = True

  @nn.compact
  def __call__(self, batch):
    x = nn.Dense(16)(batch['x'])
    for i in range(3):
      x = tiny_models.MLPBlock(16, name=f'block_{i}')(x)
      if self.mask_between and i == 0:
        x = x * batch['keep'][:, None]
    return nn.Dense(4)(x)


def _masked(mask_between):
  model = MaskedMLP(mask_between)
  n = 64
  keep = np.ones(n, np.float32)
  keep[2:] = (np.arange(n - 2) % 3 != 0)       # the two probe samples are unpadded, later ones are not
  batch = {'x': tiny_models.correlated(jax.random.key(0), n, 8), 'keep': jnp.asarray(keep)}
  params = model.init(jax.random.key(1), batch)['params']
  return params, (lambda p, b: model.apply({'params': p}, b)), batch


@pytest.mark.parametrize('mask_between', [True, False])
def test_a_mask_between_blocks_breaks_the_chain(mask_between):
  params, apply_fn, batch = _masked(mask_between)
  config = fr.QuantConfig(blocks=r'block_\d+', iters=2, batch_size=8, progress=False)
  units = plan_lib.plan_units(apply_fn, params, activations.as_arrays(batch), config)
  names = [u.name for u in units]
  chained = {u.name: u.chain_from_previous for u in units}
  assert names == ['Dense_0', 'block_0', 'block_1', 'block_2', 'Dense_1']
  assert chained['block_1'] is (not mask_between)        # the masked input is computed by running the model
  assert chained['block_0'] and chained['block_2'] and chained['Dense_1']


def test_masked_model_trains_each_block_on_the_inputs_the_model_produces():
  """RTN everywhere: every unit's reported RTN loss must be the loss on the real model's inputs to that unit."""
  params, apply_fn, batch = _masked(True)
  config = fr.QuantConfig(method='rtn', blocks=r'block_\d+', iters=0, batch_size=8, progress=False)
  result = fr.quantize(params, apply_fn, batch, config)
  block_1 = next(r for r in result.report if r['unit'] == 'block_1')
  # Recompute block_1's loss from the real model: its float output on the float model's input to block_1, against
  # the quantized block on the partially quantized model's input (Dense_0 and block_0 RTN).
  q = dict(params)
  for name in ('Dense_0', 'block_0'):
    q[name] = result.params[name]

  def input_of_block_1(p):
    captured = {}

    def grab(next_fun, args, kwargs, context):
      if context.method_name == '__call__' and context.module.path == ('block_1',):
        captured['x'] = args[0]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
      apply_fn(p, batch)
    return captured['x']

  model = tiny_models.MLPBlock(16)
  float_out = model.apply({'params': params['block_1']}, input_of_block_1(params))
  quant_out = model.apply({'params': result.params['block_1']}, input_of_block_1(q))
  expected = float(jnp.mean(jnp.sum((float_out - quant_out) ** 2, axis=-1)))
  assert block_1['loss_rtn'] == pytest.approx(expected, rel=1e-4)


def test_narrow_range_is_fingerprinted_only_when_set():
  """A QuantSpec field added later (narrow_range) keeps the fingerprints, so the checkpoints, of runs without it."""
  assert 'narrow_range' not in fr.QuantConfig().fingerprint_fields()['weight']
  narrow = fr.QuantConfig(weight=fr.QuantSpec(bits=8, symmetric=True, narrow_range=True))
  assert narrow.fingerprint_fields()['weight']['narrow_range'] is True
  assert _fp(narrow) != _fp(dataclasses.replace(narrow, weight=narrow.weight.replace(narrow_range=False)))
  # A rule making a kernel asymmetric drops the default's narrow range with its sign.
  assert fr.Rule('x', symmetric=False).apply(narrow.weight) == fr.QuantSpec(bits=8)
