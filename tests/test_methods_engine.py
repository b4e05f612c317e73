"""GPTQ, LRQ and GPTQ -> FlexRound through ``fr.quantize``: closed-form and low-rank methods on the same engine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexround_jax as fr
from flexround_jax.quantizers import gptq

import tiny_models

SPEC = fr.QuantSpec(bits=3, granularity='per_channel', grid_init='minmax')


def _quantize(make, method, blocks, iters=0, **kw):
  params, apply_fn, calib = make()
  config = fr.QuantConfig(method=method, weight=kw.pop('weight', SPEC), blocks=blocks, iters=iters, batch_size=16,
                          progress=False, fallback_to_rtn=False, **kw)
  return params, apply_fn, calib, fr.quantize(params, apply_fn, calib, config)


@pytest.mark.parametrize('make, blocks', [(tiny_models.mlp, r'block_\d+'), (tiny_models.nnx_mlp, r'block_\d+'),
                                          (tiny_models.transformer, r'layer_\d+')])
def test_gptq_in_the_engine_beats_rtn_block_by_block(make, blocks):
  """Hessians of every kernel's own inputs (DenseGeneral views, masks, nnx) reach GPTQ: each block ends below RTN."""
  _, _, _, result = _quantize(make, 'gptq', blocks)
  for r in result.report:
    assert r['methods'] == ['gptq'] and r['iters'] == 0
    assert r['loss_trained'] < r['loss_rtn'], r
    assert all(f['gptq_damp'] == pytest.approx(0.01) for f in r['method_facts'].values())


def test_gptq_on_a_lone_layer_equals_gptq_on_the_directly_computed_hessian():
  params, apply_fn, calib = tiny_models.mlp()
  config = fr.QuantConfig(method='gptq', weight=SPEC, progress=False, fallback_to_rtn=False,
                          rules=[fr.Rule(r'Dense_0', method='gptq'), fr.Rule(r'.*', skip=True)])
  result = fr.quantize(params, apply_fn, calib, config)
  x = np.asarray(calib, np.float32)
  hessian = 2.0 / x.shape[0] * x.T @ x
  kernel = params['Dense_0']['kernel']
  direct = gptq.gptq_solve(kernel, hessian, SPEC)
  ours = np.asarray(result.qtensors['Dense_0/kernel'].codes)
  assert np.mean(ours == np.asarray(direct['codes'])) > 0.99   # H summed in another order: ulps may move a tie


def test_gptq_then_flexround_starts_exactly_at_gptq_and_never_ends_worse_than_it():
  _, _, _, plain = _quantize(tiny_models.mlp, 'gptq', r'block_\d+')
  _, _, _, start = _quantize(tiny_models.mlp, 'gptq_flexround', r'block_\d+', iters=0)
  for name, qt in plain.qtensors.items():
    np.testing.assert_array_equal(qt.codes, start.qtensors[name].codes)
    np.testing.assert_array_equal(qt.scale, start.qtensors[name].scale)
  params, apply_fn, calib = tiny_models.mlp()
  config = fr.QuantConfig(method=fr.methods.gptq_flexround(lr=5e-3), weight=SPEC, blocks=r'block_\d+', iters=150,
                          batch_size=16, progress=False)
  with pytest.warns(UserWarning, match='keeping the start'):
    trained = fr.quantize(params, apply_fn, calib, config)
  assert trained.report[0]['loss_start'] == pytest.approx(start.report[0]['loss_trained'])   # same inputs
  for t in trained.report:
    assert t['methods'] == ['gptq+flexround']
    # On these rank-4 inputs GPTQ's closed form is hard to beat by STE training: where training ends worse than
    # the GPTQ start, the unit keeps the start, so the result is never worse than plain GPTQ.
    assert t['loss_final'] <= t['loss_start'] and t['kept_start'] == (t['loss_trained'] > t['loss_start'])


def test_lrq_in_the_engine_beats_rtn_and_starts_at_rtn():
  _, _, _, result = _quantize(tiny_models.mlp, fr.methods.lrq(rank=4, lr=5e-3), r'block_\d+', iters=150,
                              rules=[fr.Rule(r'Dense_\d+', method='flexround')])   # 16-input stem: rank 4 still fits
  blocks = [r for r in result.report if r['kind'] == 'block']
  assert all(r['methods'] == ['lrq'] and r['loss_trained'] < 0.9 * r['loss_rtn'] for r in blocks)
  _, _, _, start = _quantize(tiny_models.mlp, fr.methods.lrq(rank=4), r'block_\d+', iters=0,
                             rules=[fr.Rule(r'Dense_\d+', method='rtn')])
  assert all(r['loss_trained'] == r['loss_rtn'] for r in start.report)


def test_closed_form_and_low_rank_methods_refuse_conv_kernels_before_work():
  params, apply_fn, calib = tiny_models.cnn()
  with pytest.raises(ValueError, match='convolution.*gptq'):
    fr.quantize(params, apply_fn, calib, fr.QuantConfig(method='gptq', blocks=r'ResBlock_\d+', progress=False))
  with pytest.raises(ValueError, match='Conv_0/kernel.*Dense kernels'):
    fr.quantize(params, apply_fn, calib, fr.QuantConfig(method=fr.methods.lrq(rank=2), progress=False))


def test_kernels_with_one_input_share_its_hessian_and_get_the_same_codes():
  """q, k, v read the same normed input: one Hessian for the three gives the codes three separate ones give."""
  params, apply_fn, calib = tiny_models.transformer()
  config = fr.QuantConfig(method='gptq', weight=SPEC, blocks=r'layer_\d+', progress=False, fallback_to_rtn=False)
  unit = fr.engine.plan_units(apply_fn, params, calib, config)[1]
  names = unit.kernel_names()
  groups = {names[i].split('/')[-2]: names[unit.input_groups[i]].split('/')[-2] for i in range(len(names))}
  assert groups['query'] == groups['key'] == groups['value'] == 'query' and groups['out'] == 'out'
  shared = fr.quantize(params, apply_fn, calib, config)
  import flexround_jax.engine.plan as plan_lib
  real = plan_lib._input_groups
  plan_lib._input_groups = lambda kernels, order, first_call: tuple(range(len(kernels)))   # one Hessian each
  try:
    separate = fr.quantize(params, apply_fn, calib, config)
  finally:
    plan_lib._input_groups = real
  for name, qt in shared.qtensors.items():
    np.testing.assert_array_equal(qt.codes, separate.qtensors[name].codes)


def test_flexround_fused_grad_trains_like_autodiff_in_the_engine():
  """``flexround(fused_grad=True)`` through ``fr.quantize``: same start (RTN), and every block's trained loss within
  a few per cent of the default's (the gradients differ only in float rounding order)."""
  _, _, _, auto = _quantize(tiny_models.transformer, fr.methods.flexround(lr=5e-3), r'layer_\d+', iters=60)
  _, _, _, fused = _quantize(tiny_models.transformer, fr.methods.flexround(lr=5e-3, fused_grad=True), r'layer_\d+',
                             iters=60)
  assert fused.report[0]['loss_rtn'] == auto.report[0]['loss_rtn']   # later blocks see inputs of the trained ones
  for a, f in zip(auto.report, fused.report):
    assert f['loss_trained'] < f['loss_rtn']
    assert f['loss_trained'] == pytest.approx(a['loss_trained'], rel=0.05), (a, f)


def test_gptq_flexround_passes_fused_grad_and_trains_like_autodiff():
  """``gptq_flexround(fused_grad=True)``: the closed-form gradient on GPTQ's error-compensated weights (w~, a frozen
  input of the fused VJP) starts at the same GPTQ solution and trains to within a few per cent of autodiff."""
  assert fr.methods.gptq_flexround(fused_grad=True).hparams['fused_grad'] is True
  assert 'fused_grad' not in fr.methods.gptq_flexround().hparams   # default runs keep their fingerprints
  _, _, _, auto = _quantize(tiny_models.transformer, fr.methods.gptq_flexround(lr=5e-3), r'layer_\d+', iters=60)
  _, _, _, fused = _quantize(tiny_models.transformer, fr.methods.gptq_flexround(lr=5e-3, fused_grad=True),
                             r'layer_\d+', iters=60)
  assert fused.report[0]['loss_start'] == auto.report[0]['loss_start']   # later blocks see inputs of trained ones
  for a, f in zip(auto.report, fused.report):
    assert f['methods'] == ['gptq+flexround']
    assert f['loss_trained'] < f['loss_start']
    assert f['loss_trained'] == pytest.approx(a['loss_trained'], rel=0.05), (a, f)


def test_the_engine_imports_no_method_module():
  """The engine runs the Methods it is given, its baseline (RTN) included: no engine module imports a method."""
  import ast
  import pathlib
  methods = {'rtn', 'adaround', 'flexround', 'gptq', 'gptq_start', 'lrq'}
  engine = pathlib.Path(fr.engine.__file__).parent
  for path in sorted(engine.glob('*.py')):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom):
        names = [(node.module or '').split('.')[-1]] + [a.name for a in node.names]
      elif isinstance(node, ast.Import):
        names = [a.name.split('.')[-1] for a in node.names]
      else:
        continue
      assert not methods & set(names), f'{path.name}:{node.lineno} imports a method module'


def test_the_units_baseline_is_the_method_value_planning_gives_them():
  params, apply_fn, calib = tiny_models.mlp()
  config = fr.QuantConfig(method='gptq', weight=SPEC, blocks=r'block_\d+', iters=0, progress=False)
  rtn = fr.methods.rtn()
  calls = []

  def finalize(kernel, state, spec):
    calls.append(kernel.shape)
    return rtn.finalize(kernel, state, spec)
  counted = fr.methods.Method('rtn', {}, init=rtn.init, fake_quant=rtn.fake_quant, finalize=finalize)
  unit = fr.engine.plan_units(apply_fn, params, np.asarray(calib), config, baseline=counted)[1]
  default = fr.engine.plan_units(apply_fn, params, np.asarray(calib), config)[1]
  assert unit.baseline is counted and default.baseline.name == 'rtn'
  x = np.asarray(calib @ params['Dense_0']['kernel'] + params['Dense_0']['bias'])
  y = np.asarray(unit.apply(params['block_0'], [x]))
  results = [fr.engine.reconstruct_unit(u, params['block_0'], [x], [y], config) for u in (unit, default)]
  assert sorted(calls) == sorted(k.view_shape for k in unit.kernels)   # the baseline of every kernel, once each
  assert results[0].report['loss_rtn'] == results[1].report['loss_rtn']
  with pytest.raises(ValueError, match=r'baseline must be a Method that starts from init alone, untrained'):
    fr.engine.plan_units(apply_fn, params, np.asarray(calib), config, baseline=fr.methods.flexround())
