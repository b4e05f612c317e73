"""Every exporter takes an nnx State as it takes a linen dict: the same files, byte for byte; loads give the params
back in the structure of ``like=`` (an nnx State, concrete or abstract); '/' inside a key is refused everywhere."""

import dataclasses
import filecmp
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flexround_jax as fr
from flexround_jax import export, integrity, treepath
from flexround_jax.quantizers import rtn

import tiny_gguf
import tiny_models


def _as_state(params):
  """The nnx State form of a linen params dict (every leaf an ``nnx.Param``)."""
  return nnx.State(jax.tree.map(nnx.Param, params))


def _assert_bit_equal(got, want):
  got, want = treepath.flatten(got), treepath.flatten(want)
  assert list(got) == list(want)
  for name in want:
    assert np.asarray(got[name]).dtype == np.asarray(want[name]).dtype, name
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)


def _same_safetensors(a, b):
  """Same metadata and tensors (the safetensors writer orders metadata keys at random, so bytes can differ)."""
  from safetensors import safe_open
  with safe_open(a, framework='numpy') as fa, safe_open(b, framework='numpy') as fb:
    assert fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
    for k in fa.keys():
      assert integrity.array_digest(fa.get_tensor(k)) == integrity.array_digest(fb.get_tensor(k)), k


def _files_equal(a, b):
  """Same files (names and bytes) under folders ``a`` and ``b``, or equal files."""
  if os.path.isfile(a):
    return filecmp.cmp(a, b, shallow=False)
  walk = lambda root: sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
  return walk(a) == walk(b) and all(filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False)
                                    for f in walk(a))


@pytest.fixture(scope='module')
def nnx_result():
  params, apply_fn, calib = tiny_models.nnx_mlp()
  cfg = fr.QuantConfig(method='flexround', weight=fr.QuantSpec(bits=4, granularity='per_group', group_size=8),
                       blocks=r'block_\d+', iters=5, batch_size=32, progress=False)
  return params, apply_fn, calib, fr.quantize(params, apply_fn, calib, cfg)


# ------------------------------------------------------------------------------------------ safetensors, Orbax ----

def test_nnx_result_exports_and_reloads_exactly_through_safetensors(nnx_result, tmp_path):
  _, apply_fn, calib, result = nnx_result
  assert isinstance(result.params, nnx.State)
  path, linen_path = str(tmp_path / 'nnx.safetensors'), str(tmp_path / 'linen.safetensors')
  export.save_safetensors(path, result.params, result.qtensors)
  export.save_safetensors(linen_path, nnx.to_pure_dict(result.params), result.qtensors)
  _same_safetensors(path, linen_path)
  loaded = export.load_safetensors(path)
  assert isinstance(loaded, export.Loaded) and loaded.qtensors.keys() == result.qtensors.keys()
  _assert_bit_equal(loaded.params, nnx.to_pure_dict(result.params))
  params, qtensors = export.load_safetensors(path, like=result.params)
  assert isinstance(params, nnx.State) and jax.tree.structure(params) == jax.tree.structure(result.params)
  _assert_bit_equal(nnx.to_pure_dict(params), nnx.to_pure_dict(result.params))
  np.testing.assert_array_equal(apply_fn(params, calib), apply_fn(result.params, calib))
  for name, qt in result.qtensors.items():
    np.testing.assert_array_equal(qtensors[name].codes, qt.codes)


def test_nnx_result_exports_and_reloads_exactly_through_orbax(nnx_result, tmp_path):
  _, apply_fn, calib, result = nnx_result
  export.save_orbax(str(tmp_path / 'q'), result)
  params, qtensors = export.load_orbax(str(tmp_path / 'q'))
  _assert_bit_equal(params, nnx.to_pure_dict(result.params))
  loaded = export.load_orbax(str(tmp_path / 'q'), like=result.params)
  assert isinstance(loaded.params, nnx.State)
  np.testing.assert_array_equal(apply_fn(loaded.params, calib), apply_fn(result.params, calib))
  assert {n: qt.spec for n, qt in qtensors.items()} == {n: qt.spec for n, qt in result.qtensors.items()}


def test_like_an_abstract_model_gives_a_state_to_merge(nnx_result, tmp_path):
  _, apply_fn, calib, result = nnx_result
  path = str(tmp_path / 'q.safetensors')
  export.save_safetensors(path, result.params, result.qtensors)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: tiny_models.NNXMLP(nnx.Rngs(0))), nnx.Param)
  params, _ = export.load_safetensors(path, like=abstract)
  np.testing.assert_array_equal(nnx.merge(graphdef, params)(calib), apply_fn(result.params, calib))


def test_like_with_int_keys_rebuilds_the_state(tmp_path):
  """nnx lists give int keys; names are strings in the file, and ``like=`` gives the ints back."""
  kernel = np.asarray(jax.random.normal(jax.random.key(0), (16, 8)), np.float32)
  spec = fr.QuantSpec(bits=4)
  qt = rtn.finalize(jnp.asarray(kernel), rtn.init(jnp.asarray(kernel), spec), spec)
  state = _as_state({'layers': {0: {'kernel': np.asarray(qt.dequantize()), 'bias': np.ones(8, np.float32)}}})
  path = str(tmp_path / 'q.safetensors')
  export.save_safetensors(path, state, {'layers/0/kernel': qt})
  assert list(export.load_safetensors(path).params['layers']) == ['0']
  params, _ = export.load_safetensors(path, like=state)
  assert jax.tree.structure(params) == jax.tree.structure(state)
  _assert_bit_equal(params, state)


def test_like_of_another_structure_is_an_error_naming_the_param(nnx_result, tmp_path):
  _, _, _, result = nnx_result
  path = str(tmp_path / 'q.safetensors')
  export.save_safetensors(path, result.params, result.qtensors)
  export.save_orbax(str(tmp_path / 'q'), result)
  pure = nnx.to_pure_dict(result.params)
  fewer = {k: v for k, v in pure.items() if k != 'head'}
  wider = jax.tree.map(lambda a: a, pure)
  wider['head']['bias'] = np.zeros(11, np.float32)
  half = jax.tree.map(lambda a: a, pure)
  half['head']['bias'] = np.zeros(10, jnp.bfloat16)
  for load, p in ((export.load_safetensors, path), (export.load_orbax, str(tmp_path / 'q'))):
    with pytest.raises(ValueError, match=r"param 'head/bias' of the export is not in like="):
      load(p, like=_as_state(fewer))
    with pytest.raises(ValueError, match=r"param 'head/bias' is float32 \(10,\) in the export, float32 \(11,\)"):
      load(p, like=_as_state(wider))
    with pytest.raises(ValueError, match=r"param 'head/bias' is float32 \(10,\) in the export, bfloat16 \(10,\)"):
      load(p, like=wider | {'head': half['head']})
    extra = jax.tree.map(lambda a: a, pure)
    extra['head']['gain'] = np.ones(10, np.float32)
    with pytest.raises(ValueError, match=re.escape(p) + r".*param 'head/gain' of like= is not in the export"):
      load(p, like=extra)


# ---------------------------------------------------------------------------- qwix, compressed-tensors, GGUF ----

def test_qwix_takes_an_nnx_state_and_an_nnx_model(nnx_result):
  qwix = pytest.importorskip('qwix')
  params, apply_fn, calib, result = nnx_result
  pure = nnx.to_pure_dict(result.params)
  assert export.qwix_rules(result.params, result.qtensors) == export.qwix_rules(pure, result.qtensors)
  model = nnx.merge(nnx.split(tiny_models.NNXMLP(nnx.Rngs(0)))[0], params)
  qmodel, qparams = export.ptq_model(model, result.params, result.qtensors, calib[:2])
  # the codes went in as they are: the PTQ model computes the fake-quantized model's function
  np.testing.assert_array_equal(qmodel(calib), apply_fn(result.params, calib))
  assert jax.tree.structure(qparams) == jax.tree.structure(nnx.to_pure_dict(nnx.state(qmodel, nnx.Param)))
  from_dict = export.to_qwix_params(pure, result.qtensors, qmodel)
  assert jax.tree.structure(from_dict) == jax.tree.structure(qparams)
  _assert_bit_equal(from_dict, qparams)
  rules = export.qwix_rules(result.params, result.qtensors)
  abstract = nnx.eval_shape(lambda: qwix.quantize_model(tiny_models.NNXMLP(nnx.Rngs(0)), qwix.PtqProvider(rules),
                                                        calib[:2]))
  _assert_bit_equal(export.to_qwix_params(result.params, result.qtensors, abstract), qparams)


def test_qwix_linen_export_takes_the_nnx_state_form_of_its_params():
  pytest.importorskip('qwix')
  params, _, calib = tiny_models.transformer()
  model = tiny_models.Transformer()
  spec = fr.QuantSpec(bits=4, granularity='per_group', group_size=8)
  qts = {n: rtn.finalize(jnp.asarray(k), rtn.init(jnp.asarray(k), spec), spec)
         for n, k in treepath.flatten(params).items() if n.endswith('/kernel') and np.ndim(k) == 2}
  batch = jax.tree.map(lambda a: a[:2], calib)
  _, from_dict = export.ptq_model(model, params, qts, batch)
  _, from_state = export.ptq_model(model, _as_state(params), qts, batch)
  assert jax.tree.structure(from_dict) == jax.tree.structure(from_state)
  _assert_bit_equal(from_state, from_dict)


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
  config, params, template = tiny_gguf.template(tmp_path_factory.mktemp('gguf'))
  spec = fr.QuantSpec(bits=4, granularity='per_group', group_size=32, symmetric=True, scale_dtype='float16')
  qts = {n: rtn.finalize(k, rtn.init(k, spec), spec) for n, k in treepath.flatten(params).items()
         if n.endswith('/kernel') and ('/attn/' in n or '/mlp/' in n)}
  return config, params, template, qts


def test_compressed_tensors_writes_the_same_folder_from_an_nnx_state(llama, tmp_path):
  pytest.importorskip('safetensors')
  config, params, _, qts = llama
  export.save_compressed_tensors(str(tmp_path / 'linen'), params, qts, config)
  export.save_compressed_tensors(str(tmp_path / 'nnx'), _as_state(params), qts, config)
  assert _files_equal(str(tmp_path / 'linen'), str(tmp_path / 'nnx'))


def test_gguf_writes_the_same_file_from_an_nnx_state(llama, tmp_path):
  pytest.importorskip('gguf')
  _, params, template, qts = llama
  export.save_gguf(str(tmp_path / 'linen.gguf'), params, qts, template_gguf=template)
  export.save_gguf(str(tmp_path / 'nnx.gguf'), _as_state(params), qts, template_gguf=template)
  assert _files_equal(str(tmp_path / 'linen.gguf'), str(tmp_path / 'nnx.gguf'))


# -------------------------------------------------------------------------------------------- '/' inside a key ----

def test_a_slash_inside_a_key_is_refused_by_every_exporter(llama, tmp_path):
  """Flax accepts a module named 'a/b'; its leaves' '/'-joined names would be split into a path on load (or merge
  with the leaves of a module 'a' holding 'b'), so every exporter refuses the key, naming it."""
  kernel = np.asarray(jax.random.normal(jax.random.key(0), (16, 8)), np.float32)
  spec = fr.QuantSpec(bits=4)
  qt = rtn.finalize(jnp.asarray(kernel), rtn.init(jnp.asarray(kernel), spec), spec)
  params = {'a/b': {'kernel': np.asarray(qt.dequantize())}, 'a': {'b': {'bias': np.ones(8, np.float32)}}}
  qts = {'a/b/kernel': qt}
  slash = r"key 'a/b' .*holds '/'"
  for p in (params, _as_state(params)):
    with pytest.raises(ValueError, match=slash):
      export.save_safetensors(str(tmp_path / 'q.safetensors'), p, qts)
    with pytest.raises(ValueError, match=slash):
      export.save_orbax(str(tmp_path / 'q'), fr.QuantizeResult(params=p, qtensors=qts, report=[], plan=[],
                                                                config=fr.QuantConfig()))
  assert not os.listdir(tmp_path)
  pytest.importorskip('qwix')
  with pytest.raises(ValueError, match=slash):
    export.qwix_rules(params, qts)
  with pytest.raises(ValueError, match=slash):
    export.to_qwix_params(params, qts, {'a': {'b': {'kernel': kernel, 'bias': kernel[0]}}})
  config, llama_params, template, llama_qts = llama
  bad = {**llama_params, 'layers_0/attn': llama_params['layers_0']['attn']}   # the same leaves under a second name
  with pytest.raises(ValueError, match=r"key 'layers_0/attn' .*holds '/'"):
    export.save_compressed_tensors(str(tmp_path / 'ct'), bad, llama_qts, config)
  with pytest.raises(ValueError, match=r"key 'layers_0/attn' .*holds '/'"):
    export.save_gguf(str(tmp_path / 'q.gguf'), bad, llama_qts, template_gguf=template)
  assert not os.listdir(tmp_path)


def test_qtensors_not_in_the_params_are_refused_by_save_orbax(nnx_result, tmp_path):
  _, _, _, result = nnx_result
  wrong = dataclasses.replace(result, qtensors={'nowhere/kernel': next(iter(result.qtensors.values()))})
  with pytest.raises(ValueError, match=r"qtensors name kernels that are not in params: \['nowhere/kernel'\]"):
    export.save_orbax(str(tmp_path / 'q'), wrong)
