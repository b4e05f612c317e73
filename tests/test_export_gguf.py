"""GGUF export: a 2-layer Llama written as Q4_0 / Q8_0, read back with the gguf package's own reader and dequantizer."""

import dataclasses
import os

import jax
import numpy as np
import pytest

import flexround_jax as fr
from flexround_jax import export, treepath
from flexround_jax.models import llama
from flexround_jax.quantizers import flexround, rtn

import tiny_gguf


def spec(bits):
  """The grid Q4_0 / Q8_0 store: Q8_0's int8 codes are the narrow range [-127, 127]."""
  return fr.QuantSpec(bits=bits, granularity='per_group', group_size=32, symmetric=True, narrow_range=bits == 8,
                      scale_dtype='float16')


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  return tiny_gguf.template(tmp_path_factory.mktemp('gguf'))


def _qtensors(params, bits, learned=True):
  """Every kernel on the Q grid; FlexRound with perturbed divisors (codes that RTN would not give) when learned."""
  out = {}
  for i, (name, kernel) in enumerate(sorted(treepath.flatten(params).items())):
    if not name.endswith('/kernel'):
      continue
    s = spec(bits)
    state = flexround.init(kernel, s)
    if learned:
      state['log_s2'] = state['log_s2'] + 0.3 * jax.random.normal(jax.random.key(i), kernel.shape)
      state['log_s1'] = state['log_s1'] + 0.01
      out[name] = flexround.finalize(kernel, state, s)
    else:
      out[name] = rtn.finalize(kernel, rtn.init(kernel, s), s)
  return out


@pytest.mark.parametrize('bits, learned', [(4, True), (4, False), (8, True)])
def test_gguf_round_trip_is_exact(tmp_path, model, bits, learned):
  import gguf
  from gguf.quants import dequantize
  config, params, template = model
  qts = _qtensors(params, bits, learned)
  fake_quant = fr.dequantize_params(params, qts)
  path = str(tmp_path / 'q.gguf')
  info = export.save_gguf(path, fake_quant, qts, template_gguf=template)
  want = 'Q4_0' if bits == 4 else 'Q8_0'
  assert {v for k, v in info['tensors'].items() if k.endswith(('q.weight', 'k.weight', 'down.weight'))} == {want}
  assert info['tensors']['blk.0.attn_norm.weight'] == 'F32'

  # The gguf package's own reader and dequantizer give exactly our dequantized kernels ...
  reader = gguf.GGUFReader(path, 'r')
  names = llama.gguf_tensor_names(config)
  for t in reader.tensors:
    key = treepath.path_str(names[t.name])
    got = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape([int(s) for s in t.shape[::-1]])
    if key in qts:
      assert t.tensor_type.name == want
      back = llama.unpermute_qk(got, {'q_proj': 4, 'k_proj': 2}[names[t.name][-2]]) \
          if names[t.name][-2] in ('q_proj', 'k_proj') else got
      np.testing.assert_array_equal(back.T, np.asarray(qts[key].dequantize()))
  assert reader.fields['general.file_type'].contents() == (2 if bits == 4 else 7)
  assert reader.fields['tokenizer.ggml.tokens'].contents()[:3] == ['a', 'b', 'ab']
  # ... and the model loaded from the file is the fake-quant model, bit for bit.
  _, loaded, _, loaded_config = llama.load_smollm2(path)
  assert loaded_config == dataclasses.replace(config, norm_eps=float(np.float32(config.norm_eps)))   # GGUF: f32
  jax.tree.map(np.testing.assert_array_equal, loaded, fake_quant)


def test_grids_gguf_cannot_hold_are_refused_naming_the_tensor(tmp_path, model):
  _, params, template = model
  path = str(tmp_path / 'x.gguf')
  for bad in [dict(granularity='per_channel', group_size=None), dict(symmetric=False), dict(group_size=64),
              dict(scale_dtype='float32'), dict(bits=3), dict(bits=8)]:   # bits=8 without narrow_range: code -128
    qts = {}
    for name, kernel in treepath.flatten(params).items():
      if name == 'layers_1/mlp/up_proj/kernel':
        s = spec(4).replace(**bad)
        qts[name] = rtn.finalize(kernel, rtn.init(kernel, s), s)
    with pytest.raises(ValueError, match='kernel layers_1/mlp/up_proj/kernel: its grid .* cannot be stored'):
      export.save_gguf(path, params, qts, template_gguf=template)
    assert not os.path.exists(path) and not os.path.exists(path + '.tmp')


def test_q8_code_minus_128_is_refused(tmp_path, model):
  _, params, template = model
  kernel = params['layers_0']['mlp']['down_proj']['kernel']
  qt = rtn.finalize(kernel, rtn.init(kernel, spec(8)), spec(8))
  codes = np.asarray(qt.codes).copy()
  codes[0, 0] = -128
  qt = qt.__class__(codes, qt.scale, qt.zero_point, qt.spec)
  with pytest.raises(ValueError, match='code -128 cannot be stored in Q8_0'):
    export.save_gguf(str(tmp_path / 'x.gguf'), params, {'layers_0/mlp/down_proj/kernel': qt}, template_gguf=template)


def test_bad_arguments_are_clear_errors_before_writing(tmp_path, model):
  _, params, template = model
  qts = _qtensors(params, 4, learned=False)
  path = str(tmp_path / 'q.gguf')
  with pytest.raises(FileNotFoundError, match='template GGUF not found'):
    export.save_gguf(path, params, qts, template_gguf=str(tmp_path / 'missing.gguf'))
  damaged = str(tmp_path / 'damaged.gguf')
  with open(template, 'rb') as f:
    head = f.read(300)
  with open(damaged, 'wb') as f:
    f.write(head)
  with pytest.raises(ValueError, match='damaged.gguf'):
    export.save_gguf(path, params, qts, template_gguf=damaged)
  with pytest.raises(ValueError, match="'layers_9/mlp/up_proj/kernel', which is not a tensor"):
    export.save_gguf(path, params, {'layers_9/mlp/up_proj/kernel': qts['layers_0/mlp/up_proj/kernel']},
                     template_gguf=template)
  assert not os.path.exists(path)
  export.save_gguf(path, params, qts, template_gguf=template)
  with pytest.raises(FileExistsError, match='overwrite=True'):
    export.save_gguf(path, params, qts, template_gguf=template)
  export.save_gguf(path, params, qts, template_gguf=template, overwrite=True)


def test_a_failed_write_leaves_no_file(tmp_path, model, monkeypatch):
  import gguf
  _, params, template = model
  qts = _qtensors(params, 4, learned=False)
  path = str(tmp_path / 'q.gguf')

  def crash(self, *a, **kw):
    raise OSError('disk full')

  monkeypatch.setattr(gguf.GGUFWriter, 'write_tensors_to_file', crash)
  with pytest.raises(OSError, match='disk full'):
    export.save_gguf(path, params, qts, template_gguf=template)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('bad, message', [
    ('zero_scale', r'scale 0\.0 is not positive'), ('negative_scale', r'scale -0\.0[0-9]+ is not positive'),
    ('nan_scale', 'scale nan is not finite'), ('inf_scale', 'scale inf is not finite'),
    ('scale_not_float16', r'scale 0\.1000000014\d* is not exact in float16'),
    ('scale_beyond_float16', r'scale 100000\.0 is not exact in float16'),
    ('code_8', r'code 8 cannot be stored in Q4_0'), ('code_minus_9', 'code -9 cannot be stored in Q4_0'),
    ('fractional_code', r'its codes \(float32\) are not all integers')])
def test_values_gguf_cannot_hold_are_refused_naming_the_tensor_before_writing(tmp_path, model, bad, message):
  """Each used to be written (zero / negative steps) or fail as 'AssertionError ... (packing bug)'."""
  _, params, template = model
  key = 'layers_1/attn/v_proj/kernel'
  qts = _qtensors(params, 4, learned=False)
  qt = qts[key]
  codes, scale = np.array(qt.codes), np.array(qt.scale)
  if bad.endswith('scale'):
    scale.flat[5] = {'zero_scale': 0.0, 'negative_scale': -scale.flat[5], 'nan_scale': np.nan,
                     'inf_scale': np.inf}[bad]
  elif bad == 'scale_not_float16':
    scale.flat[5] = np.float32(0.1)
  elif bad == 'scale_beyond_float16':
    scale.flat[5] = 1e5
  elif bad == 'fractional_code':
    codes = codes.astype(np.float32)
    codes[3, 4] = 0.5
  else:
    codes[3, 4] = 8 if bad == 'code_8' else -9
  qts[key] = qt.__class__(codes, scale, qt.zero_point, qt.spec)
  path = tmp_path / 'q.gguf'
  with pytest.raises(ValueError, match=f'kernel {key}: {message}'):
    export.save_gguf(str(path), params, qts, template_gguf=template)
  assert os.listdir(tmp_path) == []
  path.write_bytes(b'an earlier export')   # overwrite=True replaces a file only with a complete, checked one
  with pytest.raises(ValueError, match=f'kernel {key}: {message}'):
    export.save_gguf(str(path), params, qts, template_gguf=template, overwrite=True)
  assert os.listdir(tmp_path) == ['q.gguf'] and path.read_bytes() == b'an earlier export'


@pytest.mark.parametrize('alignment', [64, 256])
def test_a_template_with_its_own_alignment_is_written_with_that_alignment(tmp_path, model, alignment):
  """general.alignment was copied as a key while the data stayed 32-byte aligned: the reader then looked for the
  tensors at other bytes."""
  import gguf
  config, params, _ = model
  template = str(tmp_path / 'aligned.gguf')
  tiny_gguf.write_gguf(template, params, config, alignment=alignment)
  qts = _qtensors(params, 4, learned=False)
  path = str(tmp_path / 'q.gguf')
  export.save_gguf(path, params, qts, template_gguf=template)
  reader = gguf.GGUFReader(path, 'r')
  assert reader.alignment == alignment and all(t.data_offset % alignment == 0 for t in reader.tensors)
  _, loaded, _, _ = llama.load_smollm2(path)
  jax.tree.map(np.testing.assert_array_equal, loaded, fr.dequantize_params(params, qts))


def test_float32_gguf_of_the_dequantized_weights(tmp_path, model):
  """keep_source_types=False: every tensor F32, the values the model computes with (a float source for
  llama-quantize); the default keeps the template's encodings."""
  _, params, template = model
  quantized = str(tmp_path / 'q4_0.gguf')
  qts = _qtensors(params, 4, learned=False)
  types = export.save_gguf(quantized, fr.dequantize_params(params, qts), qts, template_gguf=template)['tensors']
  assert 'Q4_0' in types.values()
  _, params, _, _ = llama.load_smollm2(quantized)
  assert export.save_gguf(str(tmp_path / 'kept.gguf'), params, {}, template_gguf=quantized)['tensors'] == types
  path = str(tmp_path / 'f32.gguf')
  info = export.save_gguf(path, params, {}, template_gguf=quantized, keep_source_types=False)
  assert set(info['tensors'].values()) == {'F32'}
  _, loaded, _, _ = llama.load_smollm2(path)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
