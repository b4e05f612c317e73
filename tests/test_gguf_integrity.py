"""GGUF read-back: tensor data ranges are checked for every file, and a GGUF written by ``save_gguf`` is sealed (its
metadata and every tensor's bytes are checked on load): a changed byte is a ValueError naming the file and the
tensor, never a different model."""

import json
import os
import re

import jax
import numpy as np
import pytest

import flexround_jax as fr
from flexround_jax import export, treepath
from flexround_jax.models import llama
from flexround_jax.quantizers import rtn

import tiny_gguf


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """(template: the unsealed F32 GGUF tiny_gguf writes, exported: it with every kernel Q4_0, sealed, save_gguf's
  return value)."""
  config, params = tiny_gguf.tiny_llama(dim=64, ffn_dim=96, head_dim=16)
  params = jax.tree.map(lambda a: a * 0.05, params)
  folder = tmp_path_factory.mktemp('gguf')
  template, exported = str(folder / 'template.gguf'), str(folder / 'exported.gguf')
  tiny_gguf.write_gguf(template, params, config)
  spec = fr.QuantSpec(bits=4, granularity='per_group', group_size=32, symmetric=True, scale_dtype='float16')
  qts = {name: rtn.finalize(k, rtn.init(k, spec), spec) for name, k in treepath.flatten(params).items()
         if name.endswith('/kernel')}
  return template, exported, export.save_gguf(exported, params, qts, template_gguf=template)


def _copy(src, dst) -> tuple[bytearray, str]:
  with open(src, 'rb') as f:
    data = bytearray(f.read())
  with open(dst, 'wb') as f:
    f.write(data)
  return data, str(dst)


def test_the_seal_is_in_the_metadata_and_covers_every_tensor(files):
  import gguf
  template, exported, info = files
  fields = gguf.GGUFReader(exported, 'r').fields
  assert fields[llama.GGUF_DIGEST_KEY].contents() == info['sha256']
  manifest = json.loads(fields[llama.GGUF_MANIFEST_KEY].contents())
  assert set(manifest) == set(tiny_gguf.tensor_ranges(exported)[1]) == set(info['tensors'])
  assert manifest['blk.0.attn_q.weight']['type'] == 'Q4_0' and manifest['output_norm.weight']['type'] == 'F32'
  assert llama.GGUF_DIGEST_KEY not in gguf.GGUFReader(template, 'r').fields   # an unsealed file still loads
  llama.load_smollm2(template)
  llama.load_smollm2(exported)
  assert llama.load_smollm2_tokenizer(exported).encode('ab').ids == [2]


def test_bit_flips_in_tensor_data_are_refused_naming_the_tensor(tmp_path, files):
  """40 seeded single-bit flips across the tensor data: each used to load as a different model, without error."""
  _, exported, _ = files
  ranges = list(tiny_gguf.tensor_ranges(exported)[1].items())
  starts = np.cumsum([0] + [end - begin for _, (begin, end) in ranges])   # tensor i: flat bytes starts[i]..[i + 1]
  rng = np.random.default_rng(0)
  original, path = _copy(exported, tmp_path / 'flipped.gguf')
  hit = set()
  for k in rng.choice(starts[-1], size=40, replace=False):
    i = int(np.searchsorted(starts, k, side='right')) - 1
    name, (begin, _) = ranges[i]
    hit.add(name)
    data = bytearray(original)
    data[begin + int(k - starts[i])] ^= 1 << int(rng.integers(8))
    with open(path, 'wb') as f:
      f.write(data)
    with pytest.raises(ValueError, match=re.escape(f"{path}: tensor '{name}' does not match its checksum")):
      llama.load_smollm2(path)
  assert len(hit) > 10
  with pytest.raises(ValueError, match='does not match its checksum'):
    llama.gguf_to_safetensors(path, str(tmp_path / 'out.safetensors'))
  assert not os.path.exists(tmp_path / 'out.safetensors')


@pytest.mark.parametrize('change', ['value', 'seal', 'seal_key', 'manifest_key'])
def test_metadata_changes_are_refused(tmp_path, files, change):
  import gguf
  _, exported, info = files
  data, path = _copy(exported, tmp_path / f'{change}.gguf')
  if change == 'value':   # llama.context_length 2048 -> 2049: the model would load with another config
    reader = gguf.GGUFReader(path, 'r+')
    reader.fields['llama.context_length'].parts[-1][0] = 2049
    reader.data.flush()
    del reader
  else:                   # the last character of a key name, or of the seal itself, changed
    old = {'seal': info['sha256'].encode(), 'seal_key': llama.GGUF_DIGEST_KEY.encode(),
           'manifest_key': llama.GGUF_MANIFEST_KEY.encode()}[change]
    at = data.find(old)
    assert at > 0 and data.find(old, at + 1) < 0
    data[at + len(old) - 1] ^= 1
    with open(path, 'wb') as f:
      f.write(data)
  message = ('its metadata does not match its checksum' if change in ('value', 'seal') else
             'its flexround_jax metadata keys are')
  with pytest.raises(ValueError, match=re.escape(path) + '.*' + message):
    llama.load_smollm2(path)
  with pytest.raises(ValueError, match=message):
    llama.load_smollm2_tokenizer(path)


@pytest.mark.parametrize('sealed', [False, True])
def test_a_tensor_offset_pointing_at_another_tensors_data_is_refused(tmp_path, files, sealed):
  """Sealed or not (llama.cpp's own files are not), two tensors that share bytes are refused: this used to load
  blk.1.ffn_up as a copy of blk.0.ffn_up."""
  _, path = _copy(files[1] if sealed else files[0], tmp_path / 'overlap.gguf')
  start, ranges = tiny_gguf.tensor_ranges(path)
  tiny_gguf.set_tensor_offset(path, 'blk.1.ffn_up.weight', ranges['blk.0.ffn_up.weight'][0] - start)
  with pytest.raises(ValueError, match=re.escape(path) + r": tensor '\S+' data \(bytes \d+ to \d+\) overlaps") as e:
    llama.load_smollm2(path)
  assert 'blk.1.ffn_up.weight' in str(e.value) and 'blk.0.ffn_up.weight' in str(e.value)


@pytest.mark.parametrize('sealed', [False, True])
@pytest.mark.parametrize('where', ['past_the_end', 'straddling_the_end', 'wrapping_around'])
def test_out_of_bounds_tensor_offsets_are_refused_naming_the_tensor(tmp_path, files, sealed, where):
  data, path = _copy(files[1] if sealed else files[0], tmp_path / f'{where}.gguf')
  start, _ = tiny_gguf.tensor_ranges(path)
  offset = {'past_the_end': len(data) - start + 4096, 'straddling_the_end': len(data) - start - 8,
            # the gguf reader adds in uint64: start + offset wraps around to byte 64, in the header, which used to
            # load as the norm's weights
            'wrapping_around': 2 ** 64 - start + 64}[where]
  tiny_gguf.set_tensor_offset(path, 'output_norm.weight', offset)
  with pytest.raises(ValueError, match=re.escape(path) + r": tensor 'output_norm\.weight' data .* beyond the end"):
    llama.load_smollm2(path)


def test_a_sealed_gguf_is_a_valid_template(tmp_path, files):
  """Re-exporting an exported file as it is drops the template's seal and writes the same one: the same file."""
  _, exported, info = files
  _, params, _, _ = llama.load_smollm2(exported)
  again = str(tmp_path / 'again.gguf')
  assert export.save_gguf(again, params, {}, template_gguf=exported)['sha256'] == info['sha256']
  with open(again, 'rb') as f, open(exported, 'rb') as g:
    assert f.read() == g.read()
