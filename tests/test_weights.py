"""Streaming params (issue 18): safetensors written one tensor at a time and read back as memory maps, the GGUF ->
safetensors converter, and quantization from memory-mapped params (with ``spill_dir``: finished units on disk)
equal bit for bit to quantization from params in memory."""

import dataclasses
import json
import struct

import jax
import ml_dtypes
import numpy as np
import pytest

import flexround_jax as fr
from flexround_jax import weights
from flexround_jax.models import llama

import tiny_gguf


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {'embed': {'embedding': rng.normal(size=(7, 3)).astype(np.float32)},
          'layers_0': {'kernel': rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16),
                       'bias': rng.normal(size=(5,)).astype(np.float16), 'count': np.arange(4, dtype=np.int32),
                       'empty': np.zeros((0, 2), np.float32)}}


def test_round_trip_as_memory_maps_any_dtype(tmp_path):
  tree = _tree()
  path = str(tmp_path / 'p.safetensors')
  size = weights.save_params(path, tree, {'note': 'x'})
  assert size == (tmp_path / 'p.safetensors').stat().st_size and not (tmp_path / 'p.safetensors.partial').exists()
  back = weights.load_params(path)
  assert isinstance(back['layers_0']['kernel'], np.memmap)
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  in_memory = weights.load_params(path, mmap=False)
  assert not isinstance(in_memory['layers_0']['kernel'], np.memmap)
  header, meta, start = weights.read_header(path)
  assert meta == {'note': 'x'} and start % 8 == 0 and len(header) == 5


def test_the_safetensors_package_reads_our_files(tmp_path):
  tree = {'a': {'kernel': np.arange(12, dtype=np.float32).reshape(3, 4)}, 'b': np.arange(3, dtype=np.int32)}
  path = str(tmp_path / 'p.safetensors')
  weights.save_params(path, tree)
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  ref = load_file(path)
  np.testing.assert_array_equal(ref['a/kernel'], tree['a']['kernel'])
  np.testing.assert_array_equal(ref['b'], tree['b'])


def _rewrite_header(path, edit):
  raw = open(path, 'rb').read()
  (n,) = struct.unpack('<Q', raw[:8])
  header = json.loads(raw[8:8 + n])
  edit(header)
  blob = json.dumps(header).encode()
  open(path, 'wb').write(struct.pack('<Q', len(blob)) + blob + raw[8 + n:])


@pytest.mark.parametrize('edit, match', [
    (lambda h: h['embed/embedding'].update(dtype='F8'), 'unknown or missing dtype'),
    (lambda h: h['embed/embedding'].update(shape=[7, 4]), 'needs'),
    (lambda h: h['embed/embedding'].update(shape=[7, -3]), 'non-negative'),
    (lambda h: h['layers_0/count'].update(data_offsets=[0, 16]), 'overlap'),
    (lambda h: h['layers_0/count'].update(data_offsets=[10**6, 10**6 + 16]), 'past the end'),
])
def test_bad_headers_are_named(tmp_path, edit, match):
  path = str(tmp_path / 'p.safetensors')
  weights.save_params(path, _tree())
  _rewrite_header(path, edit)
  with pytest.raises(ValueError, match=match):
    weights.load_params(path)


def test_truncated_file_and_wrong_tensor_order_are_named(tmp_path):
  path = tmp_path / 'p.safetensors'
  weights.save_params(str(path), _tree())
  raw = path.read_bytes()
  path.write_bytes(raw[:-9])
  with pytest.raises(ValueError, match='past the end'):
    weights.load_params(str(path))
  path.write_bytes(raw[:5])
  with pytest.raises(ValueError, match='too short'):
    weights.load_params(str(path))
  specs = {'a': ((2,), np.float32), 'b': ((2,), np.float32)}
  out = str(tmp_path / 'q.safetensors')
  with pytest.raises(ValueError, match="got tensor 'b', expected 'a'"):
    weights.write_params(out, specs, [('b', np.zeros(2, np.float32))])
  with pytest.raises(ValueError, match='spec says'):
    weights.write_params(out, specs, [('a', np.zeros(3, np.float32))])
  with pytest.raises(ValueError, match='never arrived'):
    weights.write_params(out, specs, [('a', np.zeros(2, np.float32))])
  assert not (tmp_path / 'q.safetensors').exists()   # a failed write leaves no file under the name


def test_gguf_conversion_streams_and_equals_the_in_memory_loader(tmp_path):
  config, params = tiny_gguf.tiny_llama()
  gguf_path = str(tmp_path / 'tiny.gguf')
  tiny_gguf.write_gguf(gguf_path, params, config)
  out = str(tmp_path / 'tiny.safetensors')
  _, ref, _, ref_config = llama.load_smollm2(gguf_path)
  assert llama.gguf_to_safetensors(gguf_path, out) == ref_config
  module, mapped, config2 = llama.load_safetensors(out)
  assert config2 == ref_config and isinstance(mapped['layers_1']['attn']['q_proj']['kernel'], np.memmap)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(mapped)):
    np.testing.assert_array_equal(np.asarray(a), b)
  tokens = np.arange(12, dtype=np.int32).reshape(2, 6) % config.vocab_size
  np.testing.assert_array_equal(module.apply({'params': ref}, tokens), module.apply({'params': mapped}, tokens))
  half = str(tmp_path / 'tiny_bf16.safetensors')
  llama.gguf_to_safetensors(gguf_path, half, dtype=ml_dtypes.bfloat16)
  assert llama.load_safetensors(half)[1]['norm']['scale'].dtype == ml_dtypes.bfloat16
  with pytest.raises(ValueError, match='not a Llama params file'):
    weights.save_params(str(tmp_path / 'plain.safetensors'), params)
    llama.load_safetensors(str(tmp_path / 'plain.safetensors'))


def test_quantize_from_memory_maps_with_spilled_units_equals_in_memory(tmp_path):
  module, params = llama.make_llama(llama.LlamaConfig(), seed=0)
  params = jax.tree.map(np.asarray, params)
  path = str(tmp_path / 'llama.safetensors')
  llama.save_safetensors(path, params, llama.LlamaConfig())
  _, mapped, _ = llama.load_safetensors(path)
  apply_fn = lambda p, t: module.apply({'params': p}, t)
  calib = np.random.default_rng(0).integers(0, 256, (8, 16)).astype(np.int32)
  cfg = fr.QuantConfig(method='flexround', blocks=r'layers_\d+', iters=6, batch_size=4, progress=False)
  ref = fr.quantize(params, apply_fn, calib, cfg)
  spill = tmp_path / 'spill'
  got = fr.quantize(mapped, apply_fn, calib, dataclasses.replace(cfg, spill_dir=str(spill)))
  assert [r['loss_final'] for r in got.report] == [r['loss_final'] for r in ref.report]
  for name, qt in ref.qtensors.items():
    assert isinstance(got.qtensors[name].codes, np.memmap)
    np.testing.assert_array_equal(got.qtensors[name].codes, qt.codes)
  q_kernel = got.params['layers_1']['mlp']['down_proj']['kernel']
  assert isinstance(q_kernel, np.memmap) and str(spill) in q_kernel.filename
  assert isinstance(got.params['embed_tokens']['embedding'], np.memmap)   # never quantized: still the input map
  for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(got.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert got.plan[0]['state_bytes'] > 0 and got.plan[0]['state_bytes_exact']


def test_writers_refuse_an_existing_file_unless_asked_and_never_a_folder(tmp_path):
  path = tmp_path / 'p.safetensors'
  path.write_bytes(b'the user\'s own file')
  with pytest.raises(FileExistsError, match='overwrite=True'):
    weights.save_params(str(path), _tree())
  specs = {'a': ((2,), np.float32)}
  with pytest.raises(FileExistsError, match='overwrite=True'):
    weights.write_params(str(path), specs, [('a', np.zeros(2, np.float32))])
  with pytest.raises(FileExistsError, match='overwrite=True'):   # before the (missing) GGUF is even opened
    llama.gguf_to_safetensors(str(tmp_path / 'absent.gguf'), str(path))
  assert path.read_bytes() == b'the user\'s own file'
  weights.save_params(str(path), _tree(), overwrite=True)
  assert set(weights.load_params(str(path))) == set(_tree())
  with pytest.raises(FileExistsError, match='folder'):
    weights.save_params(str(tmp_path), _tree(), overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['p.safetensors']   # no partial file left


def test_save_params_refuses_a_slash_inside_a_key(tmp_path):
  with pytest.raises(ValueError, match="key 'a/b'"):
    weights.save_params(str(tmp_path / 'p.safetensors'), {'a/b': {'kernel': np.zeros((2, 2), np.float32)}})
  assert not list(tmp_path.iterdir())
