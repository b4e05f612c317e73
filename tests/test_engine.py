"""End-to-end reconstruction on tiny linen and nnx models, and the engine's errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexround_jax as fr

import tiny_models

MODELS = {
    'mlp': (tiny_models.mlp, r'block_\d+'),
    'cnn': (tiny_models.cnn, r'ResBlock_\d+'),
    'transformer': (tiny_models.transformer, r'layer_\d+'),
    'nnx_mlp': (tiny_models.nnx_mlp, r'block_\d+'),
}


def _run(name, method, bits=3, iters=150, **kw):
  make, blocks = MODELS[name]
  params, apply_fn, calib = make()
  lr = kw.pop('lr', 5e-3 if method == 'flexround' else 1e-2)
  knobs = {'lr': lr, **kw.pop('knobs', {})} if method != 'rtn' else {}
  config = fr.QuantConfig(method=fr.methods.get(method, **knobs), weight=fr.QuantSpec(bits=bits, granularity='per_channel', grid_init='mse'),
                          blocks=blocks, iters=iters, batch_size=16, progress=False, **kw)
  return params, apply_fn, calib, fr.quantize(params, apply_fn, calib, config)


@pytest.mark.parametrize('name', list(MODELS))
@pytest.mark.parametrize('method', ['flexround', 'adaround'])
def test_reconstruction_beats_rtn_and_params_match_qtensors(name, method):
  params, apply_fn, calib, result = _run(name, method)
  blocks = [r for r in result.report if r['kind'] == 'block']
  assert len(blocks) == 2
  for r in result.report:
    assert r['loss_final'] <= r['loss_rtn'], r
  assert sum(r['loss_final'] for r in blocks) < 0.9 * sum(r['loss_rtn'] for r in blocks)
  # The quantized params are exactly the model rebuilt from the integer codes.
  rebuilt = fr.dequantize_params(params, result.qtensors)
  np.testing.assert_array_equal(apply_fn(result.params, calib), apply_fn(rebuilt, calib))
  paths = [jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  n_kernels = sum('kernel' in p for p in paths)
  assert len(result.qtensors) == n_kernels
  for qt in result.qtensors.values():
    assert qt.spec.bits == 3


def test_rtn_method_equals_plain_rtn_per_kernel():
  params, apply_fn, calib, result = _run('mlp', 'rtn', iters=0)
  spec = fr.QuantSpec(bits=3, granularity='per_channel', grid_init='mse')
  kernel = params['block_0']['Dense_0']['kernel']
  expected = fr.quantizers.rtn.fake_quant(kernel, fr.quantizers.rtn.init(kernel, spec), spec)
  np.testing.assert_array_equal(result.params['block_0']['Dense_0']['kernel'], expected)
  assert all(r['loss_final'] == r['loss_rtn'] for r in result.report)


def test_identical_blocks_compile_the_train_step_once():
  _, _, _, result = _run('transformer', 'flexround', iters=5)
  # embedding is not a kernel; two identical layers -> the second reuses the first one's step
  assert [r['new_train_step'] for r in result.report] == [True, False]


def test_rules_set_bits_and_skip_kernels_first_match_wins():
  rules = [fr.Rule(r'Conv_0|Dense_0', bits=8), fr.Rule(r'ResBlock_1/Conv_2', skip=True),
           fr.Rule(r'ResBlock_1/.*', bits=2)]
  params, apply_fn, calib, result = _run('cnn', 'flexround', iters=3, rules=rules)
  bits = {name: qt.spec.bits for name, qt in result.qtensors.items()}
  assert bits['Conv_0/kernel'] == 8 and bits['Dense_0/kernel'] == 8 and bits['ResBlock_0/Conv_0/kernel'] == 3
  assert 'ResBlock_1/Conv_2/kernel' not in bits and bits['ResBlock_1/Conv_0/kernel'] == 2
  np.testing.assert_array_equal(result.params['ResBlock_1']['Conv_2']['kernel'],
                                params['ResBlock_1']['Conv_2']['kernel'])


def test_depthwise_and_dense_general_kernels_are_found_with_the_right_views():
  params, apply_fn, calib, result = _run('transformer', 'rtn', iters=0)
  assert result.qtensors['layer_0/query/kernel'].shape == (16, 16)     # (in, heads, head_dim) -> (in, heads*head_dim)
  assert result.qtensors['layer_0/out/kernel'].shape == (16, 16)       # (heads, head_dim, out) -> (heads*head_dim, out)
  _, _, _, cnn_result = _run('cnn', 'rtn', iters=0)
  assert cnn_result.qtensors['ResBlock_1/Conv_1/kernel'].shape == (3, 3, 1, 8)


def test_drop_prob_and_separate_s1_rate_run():
  _, _, _, result = _run('mlp', 'flexround', iters=40, drop_prob=0.5, knobs={'lr_s1': 1e-3})
  assert all(np.isfinite(r['loss_final']) for r in result.report)


def test_dry_run_prints_the_plan_and_trains_nothing(capsys):
  make, blocks = MODELS['cnn']
  params, apply_fn, calib = make()
  result = fr.quantize(params, apply_fn, calib, fr.QuantConfig(blocks=blocks, dry_run=True))
  out = capsys.readouterr().out
  assert 'ResBlock_0' in out and 'peak activation cache' in out
  assert result.qtensors == {} and [p['unit'] for p in result.plan] == ['Conv_0', 'ResBlock_0', 'ResBlock_1',
                                                                         'Dense_0']
  assert result.plan[2]['inputs_from'] == 'previous unit'


@pytest.mark.parametrize('name', ['transformer', 'nnx_mlp'])
def test_planning_runs_the_model_once_with_values(name):
  """Planning traces the model at two batch sizes, but only the last probe computes (its values give constants and
  shared inputs); the smaller one, which only tells batched inputs apart, is traced for shapes alone."""
  make, blocks = MODELS[name]
  params, apply_fn, calib = make()
  sizes = []

  def counting(p, batch):
    leaf = jax.tree.leaves(batch)[0]
    if not isinstance(leaf, jax.core.Tracer):
      sizes.append(len(leaf))
    return apply_fn(p, batch)
  config = fr.QuantConfig(blocks=blocks, dry_run=True, progress=False)
  result = fr.quantize(params, counting, calib, config)
  assert sizes == [2]
  assert result.plan == fr.quantize(params, apply_fn, calib, config).plan


def test_fallback_to_rtn_when_training_makes_a_block_worse():
  with pytest.warns(UserWarning, match='keeping RTN'):
    _, _, _, result = _run('mlp', 'flexround', iters=30, lr=5.0)
  bad = [r for r in result.report if r['fell_back_to_rtn']]
  assert bad and all(r['loss_final'] <= r['loss_rtn'] or r['fell_back_to_rtn'] for r in result.report)


def test_spill_to_disk_gives_the_same_result(tmp_path):
  _, _, _, in_ram = _run('mlp', 'flexround', iters=20)
  _, _, _, on_disk = _run('mlp', 'flexround', iters=20, spill_dir=str(tmp_path))
  for name, qt in in_ram.qtensors.items():
    np.testing.assert_array_equal(qt.codes, on_disk.qtensors[name].codes)


def test_jsonl_log_is_written(tmp_path):
  _run('mlp', 'flexround', iters=20, log_dir=str(tmp_path))
  lines = (tmp_path / 'quantize_log.jsonl').read_text().splitlines()
  assert any('"unit_end"' in l for l in lines)


@pytest.mark.parametrize('blocks, match', [(r'nothing_\d+', 'matches no module'), (r'block_0|block_0/Dense_0',
                                                                                     'overlapping')])
def test_bad_block_regex(blocks, match):
  params, apply_fn, calib = tiny_models.mlp()
  with pytest.raises(ValueError, match=match):
    fr.quantize(params, apply_fn, calib, fr.QuantConfig(blocks=blocks, iters=1))


def test_bad_inputs_fail_before_work():
  params, apply_fn, calib = tiny_models.mlp()
  cfg = fr.QuantConfig(blocks=r'block_\d+', iters=1, progress=False)
  bad = jax.tree.map(lambda a: a, params)
  bad['block_0']['Dense_0']['kernel'] = bad['block_0']['Dense_0']['kernel'].at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match='NaN'):
    fr.quantize(bad, apply_fn, calib, cfg)
  with pytest.raises(ValueError, match='empty'):
    fr.quantize(params, apply_fn, calib[:0], cfg)
  with pytest.raises(ValueError, match='apply_fn'):
    fr.quantize(params, apply_fn, calib[:, :5], cfg)          # mis-shaped samples
  with pytest.raises(ValueError, match='NaN'):
    fr.quantize(params, apply_fn, calib.at[3, 3].set(jnp.inf), cfg)

  def broken(p, b):
    raise RuntimeError('boom')
  with pytest.raises(ValueError, match='boom'):
    fr.quantize(params, broken, calib, cfg)
  with pytest.raises(ValueError, match='unknown method'):
    fr.QuantConfig(method='no_such_method')
  with pytest.raises(ValueError, match='does not take'):
    fr.QuantConfig(method={'name': 'flexround', 'reg': 0.1})
  with pytest.raises(ValueError, match='drop_prob'):
    fr.QuantConfig(drop_prob=1.5)
  with pytest.raises(ValueError, match="Rule 'x'.*bits"):
    fr.QuantConfig(rules=[{'pattern': 'x', 'bits': 12}])
  with pytest.raises(ValueError, match='not a valid regex'):
    fr.QuantConfig(rules=[fr.Rule('(')])
  with pytest.raises(ValueError, match='takes no other setting'):
    fr.Rule('head', skip=True, bits=8)
  with pytest.raises(ValueError, match="rule 'Stem' matches no module path"):
    fr.quantize(params, apply_fn, calib, fr.QuantConfig(rules=[fr.Rule('Stem', bits=8)], iters=1))
  with pytest.raises(ValueError, match=r'Dense_0/kernel.*lrq.*rank'):   # the 16 -> 32 stem: rank 16 >= 16
    fr.quantize(params, apply_fn, calib, fr.QuantConfig(method=fr.methods.lrq(rank=16), iters=1))
  with pytest.raises(ValueError, match='batch_size'):
    fr.quantize(params, apply_fn, calib[:8], cfg)


def test_calibration_data_forms_agree():
  params, apply_fn, calib, base = _run('transformer', 'rtn', iters=0)
  batches = [jax.tree.map(lambda a: a[i:i + 32], calib) for i in range(0, 96, 32)]
  cfg = base.config
  from_batches = fr.quantize(params, apply_fn, batches, cfg)
  examples = [jax.tree.map(lambda a: np.asarray(a[i]), calib) for i in range(96)]

  class Source:   # the tfds data-source protocol: len() and indexing, examples are dicts
    def __len__(self):
      return len(examples)

    def __getitem__(self, i):
      return examples[i]
  from_source = fr.quantize(params, apply_fn, Source(), cfg)
  for name, qt in base.qtensors.items():
    np.testing.assert_array_equal(qt.codes, from_batches.qtensors[name].codes)
    np.testing.assert_array_equal(qt.codes, from_source.qtensors[name].codes)


def test_rules_give_kernels_their_own_method_inside_one_block():
  """A block can mix methods: the rule's kernels keep plain RTN codes while the others train."""
  rules = [fr.Rule(r'block_\d+/Dense_1', method='rtn')]
  params, apply_fn, calib, result = _run('mlp', 'flexround', iters=40, rules=rules)
  spec = fr.QuantSpec(bits=3, granularity='per_channel', grid_init='mse')
  for i in range(2):
    kernel = params[f'block_{i}']['Dense_1']['kernel']
    expected = fr.quantizers.rtn.finalize(kernel, fr.quantizers.rtn.init(kernel, spec), spec)
    np.testing.assert_array_equal(result.qtensors[f'block_{i}/Dense_1/kernel'].codes, expected.codes)
  blocks = [r for r in result.report if r['kind'] == 'block']
  assert all(r['methods'] == ['flexround', 'rtn'] and r['loss_final'] < r['loss_rtn'] for r in blocks)


def test_methods_are_values_with_their_own_knobs():
  method = fr.methods.adaround(lr=2e-3, reg=0.1)
  assert method.name == 'adaround' and method.hparams['reg'] == 0.1 and method.trains
  assert fr.methods.get({'name': 'adaround', 'lr': 2e-3, 'reg': 0.1}).hparams == method.hparams
  assert fr.QuantConfig(method=method).method is method
  assert not fr.methods.rtn().trains
  with pytest.raises(ValueError, match='lr'):
    fr.methods.flexround(lr=-1.0)
  with pytest.raises(ValueError, match='warmup'):
    fr.methods.adaround(warmup=1.5)


def test_adaround_schedule_matches_the_host_computed_one():
  """beta and lambda per step are what BRECQ's host loop computes (float64, rounded once to float32)."""
  from flexround_jax.quantizers import adaround
  iters, warm = 50, 10
  betas = adaround.beta_schedule(iters)
  for i in (0, 9, 10, 11, 30, 49):
    rel = 0.0 if i < warm else (i - warm) / (iters - warm)
    assert betas[i] == np.float32(20.0 + (2.0 - 20.0) * rel)
  state = {'v': jnp.zeros((4, 3))}
  assert float(adaround.penalty([state], jnp.int32(5), iters)) == 0.0   # warm-up: no regulariser
  assert float(adaround.penalty([state], jnp.int32(20), iters)) > 0.0


def test_config_round_trips_through_a_mapping():
  cfg = fr.QuantConfig(method=fr.methods.flexround(lr=1e-3), weight=fr.QuantSpec(bits=3),
                       rules=[fr.Rule('head', bits=8), fr.Rule('emb.*', skip=True)], blocks=r'layer_\d+', iters=7)
  d = cfg.describe()
  rebuilt = fr.QuantConfig.from_dict({**d, 'method': d['method'],
                                      'rules': [{k: v for k, v in r.items() if v is not None}
                                                for r in d['rules']]})
  assert rebuilt.describe() == d
  with pytest.raises(ValueError, match='unknown QuantConfig fields'):
    fr.QuantConfig.from_dict({'iterations': 3})


def test_reconstruct_unit_alone_equals_the_unit_inside_quantize():
  params, apply_fn, calib = tiny_models.mlp()
  config = fr.QuantConfig(method=fr.methods.flexround(lr=5e-3), weight=fr.QuantSpec(bits=3), blocks=r'block_\d+',
                          rules=[fr.Rule(r'Dense_\d+', skip=True)], iters=20, batch_size=16, progress=False)
  whole = fr.quantize(params, apply_fn, calib, config)
  unit = fr.engine.plan_units(apply_fn, params, np.asarray(calib), config)[0]
  x = np.asarray(calib @ params['Dense_0']['kernel'] + params['Dense_0']['bias'])
  y = np.asarray(unit.apply(params['block_0'], [x]))
  alone = fr.engine.reconstruct_unit(unit, params['block_0'], [x], [y], config)
  assert alone.report['loss_final'] == pytest.approx(whole.report[0]['loss_final'], rel=1e-5)
  for name, qt in alone.qtensors.items():
    np.testing.assert_array_equal(qt.codes, whole.qtensors[name].codes)


def _unit_and_step(iters=20):
  params, apply_fn, calib = tiny_models.mlp()
  config = fr.QuantConfig(method='flexround', weight=fr.QuantSpec(bits=3), blocks=r'block_\d+', iters=iters,
                          batch_size=8, progress=False)
  unit = fr.engine.plan_units(apply_fn, params, np.asarray(calib), config)[1]
  assert unit.name == 'block_0'
  fp_unit = params['block_0']
  views = fr.engine.kernel_views(unit, fp_unit)
  split = [m.split(m.start(v, s)) for m, v, s in zip(unit.methods, views, unit.specs)]
  trainable, frozen = [t for t, _ in split], [f for _, f in split]
  x = jax.random.normal(jax.random.key(3), (6, 8, 32))
  y = jax.random.normal(jax.random.key(4), (6, 8, 32))
  step, opt = fr.engine.make_train_step(unit, iters, drop_prob=0.0)

  def run(k_steps, first, chunk):
    tr = jax.tree.map(jnp.copy, chunk['t'])
    o = jax.tree.map(jnp.copy, chunk['o'])
    sl = slice(first, first + k_steps)
    return step(tr, o, frozen, fp_unit, [x[sl]], [y[sl]], jnp.zeros((k_steps,)), jax.random.key(0),
                jnp.int32(first))
  return trainable, opt.init(trainable), run


def test_k_steps_per_dispatch_equal_one_step_at_a_time():
  trainable, opt_state, run = _unit_and_step()
  chunk = {'t': trainable, 'o': opt_state}
  t6, o6, losses6 = run(6, 0, chunk)
  one = chunk
  losses1 = []
  for i in range(6):
    t, o, l = run(1, i, one)
    one = {'t': t, 'o': o}
    losses1.append(float(l[0]))
  chex_close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  jax.tree.map(chex_close, t6, one['t'])
  chex_close(losses6, losses1)
  assert len(set(np.asarray(losses6).tolist())) == 6   # six different minibatches, six different losses


def test_loss_curve_has_one_point_per_dispatch_and_training_time_is_reported():
  _, _, _, result = _run('mlp', 'flexround', iters=45)
  every = fr.engine.unit.curve_interval(45)
  for r in result.report:
    assert [c[0] for c in r['loss_curve']] == list(range(every, 45, every)) + [45]
    assert 0 < r['seconds_train'] <= r['seconds']
