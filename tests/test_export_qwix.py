"""qwix export: a qwix PTQ model holding our codes dequantizes to our kernels bit for bit and computes the
fake-quantized model's function (weight-only); grids qwix cannot hold fail naming the kernel."""

import dataclasses
import math

import numpy as np
import pytest

qwix = pytest.importorskip('qwix', reason='qwix export needs qwix: pip install --no-deps qwix==0.1.8')

from qwix._src.providers.ptq import WithAux  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

import flexround_jax as fr  # pylint: disable=g-import-not-at-top,wrong-import-position
from flexround_jax import export, treepath  # pylint: disable=g-import-not-at-top,wrong-import-position
from flexround_jax.quantizers import flexround, rtn  # pylint: disable=g-import-not-at-top,wrong-import-position

import tiny_gguf  # pylint: disable=g-import-not-at-top,wrong-import-position
import tiny_models  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")   # qwix 0.1.8

# Weight-only outputs, jitted both ways, relative to max |output|. qwix dequantizes to our kernels exactly and runs
# the same float dot_general, so this is headroom for XLA fusing differently elsewhere (measured on CPU: 0, jitted
# and un-jitted, tiny transformer, MiniLM-L6 and the Llama).
RTOL = 1e-5


def _kernels(params):
  return {n: k for n, k in treepath.flatten(params).items() if n.endswith('/kernel') and np.ndim(k) >= 2}


def _quantize(params, spec_of, n_in_axes=lambda name: 1, perturb=0.3):
  """{name: QTensor} of every kernel on its 2-D view (prod in, prod out), FlexRound with perturbed S2 (codes that
  round-to-nearest would not give)."""
  out = {}
  for i, (name, kernel) in enumerate(sorted(_kernels(params).items())):
    k = n_in_axes(name)
    view = jnp.asarray(kernel).reshape(math.prod(kernel.shape[:k]), math.prod(kernel.shape[k:]))
    spec = spec_of(name)
    state = flexround.init(view, spec)
    state['log_s2'] = perturb * jax.random.normal(jax.random.key(i), view.shape)
    out[name] = flexround.finalize(view, state, spec)
  return out


def _check_kernels_exact(params, qtensors, qparams):
  """Every exported kernel is a qwix QArray that dequantizes to our fake-quant kernel bit for bit."""
  fake = treepath.flatten(fr.dequantize_params(params, qtensors))
  leaves = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=lambda x: isinstance(x, WithAux))[0]
  flat = {treepath.path_str(treepath.path_names(kp)): leaf for kp, leaf in leaves}
  for name in qtensors:
    assert isinstance(flat[name], WithAux), name
    qarray = flat[name].array
    np.testing.assert_array_equal(np.asarray(qwix.dequantize(qarray)).reshape(fake[name].shape), fake[name],
                                  err_msg=name)


def _compare(ours, theirs):
  """(max abs, max abs / max |ours|) and the assertion of RTOL."""
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  abs_err = float(np.abs(ours - theirs).max())
  rel_err = abs_err / float(np.abs(ours).max())
  assert rel_err <= RTOL, (abs_err, rel_err)
  return abs_err, rel_err


# ------------------------------------------------------------------------------------------- tiny transformer ----

TINY_SPECS = {   # every grid kind: Dense and DenseGeneral kernels, 2..8 bits, ragged groups (12 on 16 / 32 inputs)
    'fc1': fr.QuantSpec(bits=4, symmetric=True),
    'fc2': fr.QuantSpec(bits=3, granularity='per_group', group_size=12),
    'key': fr.QuantSpec(bits=8, granularity='per_tensor'),
    'out': fr.QuantSpec(bits=2, symmetric=True),
    'query': fr.QuantSpec(bits=5, granularity='per_group', group_size=8, symmetric=True),
    'value': fr.QuantSpec(bits=6, granularity='per_group', group_size=12),
}


def _tiny_n_in(name):
  return 2 if name.endswith('out/kernel') else 1   # DenseGeneral(axis=(-2, -1)): (heads, head_dim, d)


@pytest.fixture(scope='module')
def tiny():
  params, apply_fn, batch = tiny_models.transformer()
  batch = jax.tree.map(lambda x: x[:16], batch)
  qtensors = _quantize(params, lambda name: TINY_SPECS[name.split('/')[-2]], _tiny_n_in)
  ours = jax.jit(apply_fn)(fr.dequantize_params(params, qtensors), batch)
  return params, batch, qtensors, ours


def test_tiny_transformer_runs_our_codes_in_qwix(tiny):
  params, batch, qtensors, ours = tiny
  rules = export.qwix_rules(params, qtensors)
  by_module = {m: r for r in rules for m in r.module_path[3:-1].split('|')}
  assert sorted(by_module) == sorted(n.rpartition('/')[0] for n in qtensors)
  assert all(r.act_qtype is None for r in rules)
  assert by_module['layer_0/fc1'].weight_qtype == jnp.int4 and by_module['layer_0/fc1'].tile_size is None
  assert by_module['layer_0/fc2'].weight_qtype == jnp.int4 and by_module['layer_0/fc2'].tile_size == 4  # gcd(12, 32)
  assert by_module['layer_0/fc2'].weight_calibration_method == 'minmax'
  assert by_module['layer_0/key'].weight_qtype == jnp.int8
  assert by_module['layer_0/out'].weight_qtype == 'int2'
  assert by_module['layer_0/query'].weight_qtype == 'int5' and by_module['layer_0/query'].tile_size == 8
  assert by_module['layer_0/value'].weight_qtype == jnp.int8 and by_module['layer_0/value'].tile_size == 4

  qmodel, qparams = export.ptq_model(tiny_models.Transformer(), params, qtensors, batch)
  _check_kernels_exact(params, qtensors, qparams)
  fc2 = qparams['layer_0']['fc2']['kernel'].array
  assert fc2.scale.shape == (8, 16) and fc2.zero_point.shape == (8, 16) and fc2.qvalue.dtype == jnp.int4
  assert qparams['layer_0']['out']['kernel'].array.scale.shape == (1, 1, 16)
  _compare(ours, jax.jit(qmodel.apply)({'params': qparams}, batch))


def test_codes_are_learned_not_round_to_nearest(tiny):
  params, _, qtensors, _ = tiny
  kernels = _kernels(params)
  moved = 0
  for name, qt in qtensors.items():
    view = jnp.asarray(kernels[name]).reshape(qt.codes.shape)
    moved += int(np.sum(np.asarray(rtn.finalize(view, rtn.init(view, qt.spec), qt.spec).codes) != qt.codes))
  assert moved > 0


def test_int8_activations_are_a_different_function(tiny):
  params, batch, qtensors, ours = tiny
  qmodel, qparams = export.ptq_model(tiny_models.Transformer(), params, qtensors, batch, act_qtype=jnp.int8)
  theirs = np.asarray(jax.jit(qmodel.apply)({'params': qparams}, batch))
  rel = np.linalg.norm(theirs - ours) / np.linalg.norm(ours)
  assert 0 < rel < 0.05, rel


# ------------------------------------------------------------------------------------------ real MiniLM-L6 ----

def test_minilm_all_layers_in_qwix():
  from flexround_jax.models import bert  # pylint: disable=g-import-not-at-top
  module, params, _ = bert.load_minilm()
  specs = {'intermediate': fr.QuantSpec(bits=4, granularity='per_group', group_size=128, symmetric=True),
           'output': fr.QuantSpec(bits=3, granularity='per_group', group_size=96)}
  qtensors = _quantize(params, lambda name: specs.get(name.split('/')[-2], fr.QuantSpec(bits=4)), perturb=0.1)
  assert len(qtensors) == 36
  batch = bert.encode(['A man is eating food.', 'The new movie is awesome.', 'Quantized weights, learned rounding.',
                       'Two short sentences.'], 16)
  args = (batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
  qmodel, qparams = export.ptq_model(module, params, qtensors, *args)
  _check_kernels_exact(params, qtensors, qparams)
  ours = jax.jit(module.apply)({'params': fr.dequantize_params(params, qtensors)}, *args)
  _compare(ours, jax.jit(qmodel.apply)({'params': qparams}, *args))


# ---------------------------------------------------------------------------------- SmolLM2-shaped Llama ----

def test_llama_in_qwix():
  from flexround_jax.models import llama  # pylint: disable=g-import-not-at-top
  config, params = tiny_gguf.tiny_llama(dim=64, ffn_dim=80, head_dim=16)
  params = jax.tree.map(lambda a: a * 0.05, params)
  spec = fr.QuantSpec(bits=4, granularity='per_group', group_size=32)   # down_proj: 80 inputs = 32 + 32 + 16
  qtensors = _quantize(params, lambda name: spec)
  assert len(qtensors) == 14
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, config.vocab_size)
  module = llama.Llama(config)
  qmodel, qparams = export.ptq_model(module, params, qtensors, tokens)
  assert qparams['layers_0']['mlp']['down_proj']['kernel'].array.scale.shape == (5, 64)   # tiles of gcd(32, 80)
  _check_kernels_exact(params, qtensors, qparams)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(qparams))   # tiny_llama's params are numpy
  fake = fr.dequantize_params(params, qtensors)
  _compare(jax.jit(module.apply)({'params': fake}, tokens), jax.jit(qmodel.apply)({'params': qparams}, tokens))
  _compare(module.apply({'params': fake}, tokens), qmodel.apply({'params': qparams}, tokens))   # and un-jitted


# ---------------------------------------------------------------------------------- what qwix cannot hold ----

def test_conv_kernels_are_refused_naming_the_kernel():
  kernel = np.random.default_rng(0).normal(size=(3, 3, 1, 8)).astype(np.float32)   # nn.Conv(8, (3, 3)) on 1 channel
  params = {'Conv_0': {'kernel': kernel, 'bias': np.zeros(8, np.float32)}}
  spec = fr.QuantSpec(bits=4)
  qtensors = {'Conv_0/kernel': rtn.finalize(kernel, rtn.init(kernel, spec), spec)}
  with pytest.raises(ValueError, match=r"kernel 'Conv_0/kernel': convolution kernels cannot be exported"):
    export.qwix_rules(params, qtensors)
  assert export.qwix_rules(params, qtensors, float_fallback=True) == []


def test_grouped_kernel_with_two_input_axes_is_refused_or_kept_float(tiny):
  params, batch, qtensors, _ = tiny
  bad = dict(qtensors)
  kernel = jnp.asarray(params['layer_1']['out']['kernel']).reshape(16, 16)
  spec = fr.QuantSpec(bits=4, granularity='per_group', group_size=4)
  bad['layer_1/out/kernel'] = rtn.finalize(kernel, rtn.init(kernel, spec), spec)
  with pytest.raises(ValueError, match=r"kernel 'layer_1/out/kernel': a per-group grid .* several input axes"):
    export.qwix_rules(params, bad)
  qmodel, qparams = export.ptq_model(tiny_models.Transformer(), params, bad, batch, float_fallback=True)
  kept = qparams['layer_1']['out']['kernel']
  assert isinstance(kept, jax.Array)
  np.testing.assert_array_equal(kept, fr.dequantize_params(params, bad)['layer_1']['out']['kernel'])
  ours = jax.jit(tiny_models.Transformer().apply)({'params': fr.dequantize_params(params, bad)}, batch)
  _compare(ours, jax.jit(qmodel.apply)({'params': qparams}, batch))


def _abstract(params, batch, rules):
  qmodel = qwix.quantize_model(tiny_models.Transformer(), qwix.PtqProvider(rules))
  return jax.eval_shape(qmodel.init, jax.random.key(0), batch)['params']


def test_mismatched_rules_and_scale_dtypes_fail_naming_the_kernel(tiny):
  params, batch, qtensors, _ = tiny
  rules = export.qwix_rules(params, qtensors)
  abstract = _abstract(params, batch, rules)
  # a rule for one more module than we quantized
  partial = {n: qt for n, qt in qtensors.items() if n != 'layer_1/fc1/kernel'}
  with pytest.raises(ValueError, match=r"qwix quantizes kernel 'layer_1/fc1/kernel', which has no QTensor"):
    export.to_qwix_params(params, partial, abstract)
  # our kernel without a rule
  with pytest.raises(ValueError, match=r"kernel 'layer_1/fc1/kernel' has a QTensor but qwix does not quantize it"):
    export.to_qwix_params(params, qtensors, _abstract(params, batch, export.qwix_rules(params, partial)))
  # a narrower type than our codes: 8-bit codes in an int4 rule
  narrow = _abstract(params, batch, [qwix.QuantizationRule(module_path='layer_0/key', weight_qtype=jnp.int4,
                                                           weight_calibration_method='minmax')] + rules)
  with pytest.raises(ValueError, match=r"kernel 'layer_0/key/kernel': its codes span .* outside \[-8, 7\]"):
    export.to_qwix_params(params, qtensors, narrow)
  # a bfloat16 scale takes only steps exact in bfloat16
  aux = abstract['layer_0']['fc1']['kernel']
  bf16 = aux.replace(array=dataclasses.replace(aux.array, scale=jax.ShapeDtypeStruct(aux.array.scale.shape,
                                                                                     jnp.bfloat16)))
  abstract_bf16 = jax.tree.map(lambda x: x, abstract)
  abstract_bf16['layer_0']['fc1']['kernel'] = bf16
  with pytest.raises(ValueError, match=r"kernel 'layer_0/fc1/kernel': its float32 scales are not exact in .*bfloat16"):
    export.to_qwix_params(params, qtensors, abstract_bf16)
  kernel = jnp.asarray(params['layer_0']['fc1']['kernel'])
  spec = dataclasses.replace(qtensors['layer_0/fc1/kernel'].spec, scale_dtype='bfloat16')
  exact = dict(qtensors, **{'layer_0/fc1/kernel': rtn.finalize(kernel, rtn.init(kernel, spec), spec)})
  qparams = export.to_qwix_params(params, exact, abstract_bf16)
  assert qparams['layer_0']['fc1']['kernel'].array.scale.dtype == jnp.bfloat16
