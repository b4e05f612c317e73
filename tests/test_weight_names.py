"""Weights not called 'kernel' (QuantConfig.weight_params): a Gemma-style einsum model with weights 'w'."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flexround_jax as fr
from flexround_jax.engine import checkpoint

D, N, H, F = 16, 2, 8, 24


class Einsum(nn.Module):
  """As Google DeepMind's ``gemma`` Einsum: a weight 'w' of ``shape``, the equation given at call time, first."""
  shape: tuple[int, ...]

  @nn.compact
  def __call__(self, eqn: str, x):
    w = self.param('w', nn.initializers.normal(0.3), self.shape)
    return jnp.einsum(eqn, x, w)


class Block(nn.Module):

  @nn.compact
  def __call__(self, x):
    q = Einsum((N, D, H), name='q')('BTD,NDH->BTNH', x)           # input axis in the middle: a transposed view
    x = x + Einsum((N, H, D), name='o')('BTNH,NHD->BTD', nn.gelu(q))   # inputs leading: a reshape
    g = Einsum((2, F, D), name='gate')('BTD,CFD->BTCF', x)        # input axis last
    return x + Einsum((F, D), name='down')('BTF,FD->BTD', nn.gelu(g[..., 0, :]) * g[..., 1, :])


class Model(nn.Module):

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = Block(name=f'block_{i}')(x)
    return x


WEIGHTS = (fr.WeightParam.einsum(r'.*/q', 'BTD,NDH->BTNH'), fr.WeightParam.einsum(r'.*/o', 'BTNH,NHD->BTD'),
           fr.WeightParam.einsum(r'.*/gate', 'BTD,CFD->BTCF'), fr.WeightParam(r'.*/down', 'w'))


@pytest.fixture(scope='module')
def model():
  x = jax.random.normal(jax.random.PRNGKey(1), (64, 4, D))
  module = Model()
  params = module.init(jax.random.PRNGKey(0), x[:1])['params']
  return params, lambda p, b: module.apply({'params': p}, b), x


def _config(**kw):
  return fr.QuantConfig(**{'method': 'rtn', 'iters': 0, 'blocks': r'block_\d', 'batch_size': 16, 'progress': False,
                           'weight_params': WEIGHTS, **kw})


@pytest.fixture(scope='module')
def rtn(model):
  return fr.quantize(*model, _config())


def test_einsum_from_equation():
  assert [w.in_axes for w in WEIGHTS] == [(1,), (0, 1), (2,), None]
  with pytest.raises(ValueError, match=r"index 'N' .* in the input and the output"):
    fr.WeightParam.einsum('a', 'BNTH,NHK->BNTK')
  with pytest.raises(ValueError, match='x,w->out'):
    fr.WeightParam.einsum('a', 'BTD,NDH')


def test_rtn_quantizes_every_w_and_its_qtensor_dequantizes_to_the_params(model, rtn):
  params = model[0]
  names = sorted(rtn.qtensors)
  assert names == sorted(f'block_{i}/{m}/w' for i in range(2) for m in ('q', 'o', 'gate', 'down'))
  assert rtn.qtensors['block_0/q/w'].axes == (1, 0, 2) and rtn.qtensors['block_0/q/w'].shape == (D, N * H)
  assert rtn.qtensors['block_0/o/w'].axes is None and rtn.qtensors['block_0/o/w'].shape == (N * H, D)
  assert rtn.qtensors['block_0/gate/w'].axes == (2, 0, 1) and rtn.qtensors['block_0/gate/w'].shape == (D, 2 * F)
  for name, qt in rtn.qtensors.items():
    b, m, _ = name.split('/')
    got = np.asarray(rtn.params[b][m]['w'])
    assert np.array_equal(np.asarray(qt.to_weight(got.shape)), got)
    assert not np.array_equal(got, np.asarray(params[b][m]['w']))
    assert np.abs(got - np.asarray(params[b][m]['w'])).max() < 0.2 * np.abs(np.asarray(params[b][m]['w'])).max()
  again = fr.dequantize_params(params, rtn.qtensors)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(rtn.params)))


def test_per_channel_grids_run_along_the_declared_output_axes(model, rtn):
  params, apply_fn, x = model
  w = np.asarray(params['block_0']['q']['w'])                    # (N, D, H), inputs on axis 1
  qt = rtn.qtensors['block_0/q/w']
  assert qt.scale.shape == (1, N * H)
  view = np.transpose(w, (1, 0, 2)).reshape(D, N * H)
  scale = np.asarray(qt.scale)[0]
  # 4-bit asymmetric min-max: the range [min(w, 0), max(w, 0)] of each output element over its D inputs, / 15
  assert np.allclose(scale, (np.maximum(view.max(axis=0), 0) - np.minimum(view.min(axis=0), 0)) / 15, rtol=1e-5)
  # scaling the inputs of one output element (n=1, h=3) changes its scale alone
  w2 = w.copy()
  w2[1, :, 3] *= 10
  p2 = jax.tree.map(lambda a: a, params)
  p2['block_0']['q']['w'] = jnp.asarray(w2)
  scale2 = np.asarray(fr.quantize(p2, apply_fn, x, _config()).qtensors['block_0/q/w'].scale)[0]
  changed = np.flatnonzero(~np.isclose(scale2, scale))
  assert changed.tolist() == [1 * H + 3]
  grouped = fr.quantize(params, apply_fn, x, _config(weight=fr.QuantSpec(bits=4, granularity='per_group',
                                                                         group_size=8)))
  assert grouped.qtensors['block_0/q/w'].scale.shape == (D // 8, N * H)   # groups along the D inputs


def test_flexround_beats_rtn_on_the_block_loss(model, rtn):
  res = fr.quantize(*model, _config(method=fr.methods.flexround(lr=3e-3), iters=40, batch_size=16))
  for r in res.report:
    assert r['loss_trained'] < r['loss_rtn'], r
  assert sum(r['loss_final'] for r in res.report) < sum(r['loss_rtn'] for r in rtn.report)
  for name, qt in res.qtensors.items():
    b, m, _ = name.split('/')
    assert np.array_equal(np.asarray(qt.to_weight(res.params[b][m]['w'].shape)), np.asarray(res.params[b][m]['w']))


def test_safetensors_and_orbax_round_trips(model, rtn, tmp_path):
  qt = rtn.qtensors['block_0/q/w']
  assert fr.QTensor.unpack(qt.pack()).axes == (1, 0, 2)
  fr.export.save_safetensors(str(tmp_path / 'm.safetensors'), rtn.params, rtn.qtensors)
  fr.export.save_orbax(str(tmp_path / 'orbax'), rtn)
  for loaded in (fr.export.load_safetensors(str(tmp_path / 'm.safetensors')),
                 fr.export.load_orbax(str(tmp_path / 'orbax'))):
    assert jax.tree.structure(loaded.params) == jax.tree.structure(jax.tree.map(np.asarray, rtn.params))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(rtn.params)))
    assert set(loaded.qtensors) == set(rtn.qtensors)
    for name, qt in loaded.qtensors.items():
      assert qt.axes == rtn.qtensors[name].axes
      assert np.array_equal(qt.codes, rtn.qtensors[name].codes)


def test_a_missing_or_ambiguous_weight_and_gptq_are_errors_naming_it(model):
  with pytest.raises(ValueError, match=r"WeightParam\('\.\*/q', 'weight'\) names no param: none of the 2 matching "
                                       r"modules .* has a param 'weight'"):
    fr.quantize(*model, _config(weight_params=(fr.WeightParam(r'.*/q', 'weight'),)))
  with pytest.raises(ValueError, match=r"WeightParam\('attn', 'w'\) names no param: no module path matches"):
    fr.quantize(*model, _config(weight_params=(fr.WeightParam('attn', 'w'),)))
  with pytest.raises(ValueError, match=r'weight block_0/q/w has shape \(2, 16, 8\): its layout is ambiguous'):
    fr.quantize(*model, _config(weight_params=(fr.WeightParam(r'.*/q', 'w'),)))
  with pytest.raises(ValueError, match=r'in_axes=\(0, 1, 2\) must be some of its 3 axes'):
    fr.quantize(*model, _config(weight_params=(fr.WeightParam(r'.*/q', 'w', (0, 1, 2)),)))
  with pytest.raises(ValueError, match=r"weight block_0/down/w is named by a WeightParam; method 'gptq' solves"):
    fr.quantize(*model, _config(method='gptq'))
  with pytest.raises(ValueError, match='no quantizable kernel'):   # 'w' is not a kernel unless named
    fr.quantize(*model, _config(weight_params=()))
  with pytest.raises(ValueError, match="'kernel' params are quantized without"):
    fr.WeightParam('a', 'kernel')
  with pytest.raises(ValueError, match='in_axes must be distinct'):
    fr.WeightParam('a', 'w', (1, 1))
  cfg = fr.QuantConfig.from_dict({'weight_params': [{'pattern': 'a', 'name': 'w', 'in_axes': [1]}]})
  assert cfg.weight_params == (fr.WeightParam('a', 'w', (1,)),)


def test_weight_params_are_fingerprinted_and_a_resume_with_others_is_refused(model, tmp_path):
  tree, calib = {'w': np.ones((4, 4), np.float32)}, np.zeros((8, 4), np.float32)
  fp = lambda cfg: checkpoint.fingerprint(tree, calib, cfg, 'model', 1)
  base = fr.QuantConfig()
  assert 'weight_params' not in base.fingerprint_fields()   # runs without them keep their fingerprints
  one = dataclasses.replace(base, weight_params=(fr.WeightParam('a', 'w', (1,)),))
  assert len({fp(base), fp(one), fp(dataclasses.replace(base, weight_params=(fr.WeightParam('a', 'w', (0,)),)))}) == 3
  cfg = _config(checkpoint_dir=str(tmp_path))
  fr.quantize(*model, cfg)
  other = tuple(fr.WeightParam(w.pattern, w.name, (0,)) if w.pattern == r'.*/q' else w for w in WEIGHTS)
  with pytest.raises(ValueError, match='different config'):
    fr.quantize(*model, dataclasses.replace(cfg, weight_params=other))
  resumed = fr.quantize(*model, cfg)
  assert resumed.resumed_units == 2 and resumed.qtensors['block_0/q/w'].axes == (1, 0, 2)


class NnxEinsum(nnx.Module):

  def __init__(self, shape, eqn, rngs):
    self.eqn = eqn
    self.w = nnx.Param(jax.random.normal(rngs.params(), shape) * 0.3)

  def __call__(self, x):
    return jnp.einsum(self.eqn, x, self.w[...])


class NnxModel(nnx.Module):

  def __init__(self, rngs):
    self.q = NnxEinsum((N, D, H), 'BTD,NDH->BTNH', rngs)
    self.o = NnxEinsum((N, H, D), 'BTNH,NHD->BTD', rngs)

  def __call__(self, x):
    return self.o(nn.gelu(self.q(x)))


def test_nnx_einsum_module():
  graphdef, state = nnx.split(NnxModel(nnx.Rngs(0)), nnx.Param)
  apply_fn = lambda p, b: nnx.merge(graphdef, p)(b)
  x = jax.random.normal(jax.random.PRNGKey(1), (32, 4, D))
  cfg = fr.QuantConfig(method='flexround', iters=5, batch_size=8, progress=False,
                       weight_params=(fr.WeightParam.einsum('q', 'BTD,NDH->BTNH'),
                                      fr.WeightParam.einsum('o', 'BTNH,NHD->BTD')))
  res = fr.quantize(state, apply_fn, x, cfg)
  assert sorted(res.qtensors) == ['o/w', 'q/w'] and res.qtensors['q/w'].axes == (1, 0, 2)
  out = nnx.to_pure_dict(res.params)
  assert np.array_equal(np.asarray(res.qtensors['q/w'].to_weight((N, D, H))), np.asarray(out['q']['w']))


class TwoWeights(nn.Module):
  """One module, two weights (as an MLP written as one module)."""

  @nn.compact
  def __call__(self, x):
    w_in = self.param('w_in', nn.initializers.normal(0.3), (D, F))
    w_out = self.param('w_out', nn.initializers.normal(0.3), (F, D))
    return nn.gelu(x @ w_in) @ w_out


def test_two_weights_in_one_module():
  module = TwoWeights()
  x = jax.random.normal(jax.random.PRNGKey(1), (32, D))
  params = module.init(jax.random.PRNGKey(0), x[:1])['params']
  apply_fn = lambda p, b: module.apply({'params': p}, b)
  cfg = fr.QuantConfig(method='rtn', iters=0, progress=False,
                       weight_params=(fr.WeightParam('', 'w_in'), fr.WeightParam('', 'w_out')))
  res = fr.quantize(params, apply_fn, x, cfg)
  assert sorted(res.qtensors) == ['w_in', 'w_out'] and res.qtensors['w_in'].axes is None
  with pytest.raises(ValueError, match="module '' holds several quantized weights"):
    fr.quantize(params, apply_fn, x, dataclasses.replace(cfg, activation='lsq'))


def test_a_model_that_is_one_dense_layer():   # the root module holds the kernel itself (module path '')
  module = nn.Dense(8)
  x = jax.random.normal(jax.random.PRNGKey(1), (32, D))
  params = module.init(jax.random.PRNGKey(0), x[:1])['params']
  res = fr.quantize(params, lambda p, b: module.apply({'params': p}, b), x, fr.QuantConfig(method='rtn', iters=0,
                                                                                           progress=False))
  assert sorted(res.qtensors) == ['kernel'] and res.report[0]['unit'] == ''


class QTransposed(nn.Module):

  @nn.compact
  def __call__(self, x):
    return Einsum((N, D, H), name='q')('BTD,NDH->BTNH', x)


class QInputsFirst(nn.Module):

  @nn.compact
  def __call__(self, x):
    return Einsum((D, N, H), name='q')('BTD,DNH->BTNH', x)


def test_a_transposed_weight_quantizes_as_the_same_weight_laid_out_inputs_first():
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 4, D))
  pa = QTransposed().init(jax.random.PRNGKey(1), x[:1])['params']
  pb = {'q': {'w': jnp.transpose(pa['q']['w'], (1, 0, 2))}}
  runs = []
  for module, params, eqn in ((QTransposed(), pa, 'BTD,NDH->BTNH'), (QInputsFirst(), pb, 'BTD,DNH->BTNH')):
    cfg = fr.QuantConfig(method='flexround', iters=10, batch_size=8, progress=False,
                         weight_params=(fr.WeightParam.einsum('q', eqn),))
    runs.append(fr.quantize(params, lambda p, b, m=module: m.apply({'params': p}, b), x, cfg))
  a, b = (r.qtensors['q/w'] for r in runs)
  assert a.axes == (1, 0, 2) and b.axes is None
  assert np.array_equal(a.codes, b.codes) and np.array_equal(a.scale, b.scale)
  assert runs[0].report[0]['loss_curve'] == runs[1].report[0]['loss_curve']
  assert np.array_equal(np.transpose(runs[0].params['q']['w'], (1, 0, 2)), runs[1].params['q']['w'])
