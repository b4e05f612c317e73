"""GGUF files as a source of the one Decoder (models.gguf), and its HF-layout round trip (export.save_hf)."""

import dataclasses
import json
import re

import jax
import numpy as np
import pytest

pytest.importorskip('gguf', reason='the gguf package reads GGUF files (flexround_jax[llm])')
pytest.importorskip('tokenizers', reason='the GGUF tokenizer needs tokenizers (flexround_jax[llm])')

import tiny_gguf  # pylint: disable=g-import-not-at-top,wrong-import-position

from flexround_jax import export  # pylint: disable=g-import-not-at-top,wrong-import-position
from flexround_jax.models import gguf, hf, llama  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """(LlamaConfig, params, path) of the tiny Llama written as GGUF by llama.cpp's converter's rules."""
  return tiny_gguf.template(tmp_path_factory.mktemp('gguf'))


TOKENS = np.arange(24, dtype=np.int32).reshape(2, 12) * 5 % 64


def test_gguf_loads_as_the_decoder_with_the_llama_params_and_logits(tiny):
  config, params, path = tiny
  model = gguf.load_gguf(path)
  assert model.config == dataclasses.replace(llama.decoder_config(config), norm_eps=float(np.float32(config.norm_eps)))
  assert model.path == path
  jax.tree.map(np.testing.assert_array_equal, model.params, params)   # q/k rows un-permuted, kernels transposed
  ours = np.asarray(model.apply_fn(model.params, TOKENS))
  old = np.asarray(llama.Llama(config).apply({'params': params}, TOKENS))
  np.testing.assert_allclose(ours, old, rtol=1e-5, atol=1e-5)   # RoPE frequencies rounded in another order
  assert model.tokenizer.encode('ab').ids == [2]


def test_save_hf_then_load_hf_gives_the_same_model(tiny, tmp_path):
  _, _, path = tiny
  model = gguf.load_gguf(path)
  _, meta = gguf.open_gguf(path, tensors=False)
  out = tmp_path / 'hf'
  info = export.save_hf(str(out), model.params, model.config, tokenizer=model.tokenizer,
                        config_fields=gguf.hf_config_fields(meta))
  assert sorted(p.name for p in out.iterdir()) == ['config.json', 'model.safetensors', 'tokenizer.json']
  assert 'model.layers.1.self_attn.q_proj.weight' in info['tensors']
  config_json = json.loads((out / 'config.json').read_text())
  assert (config_json['architectures'], config_json['bos_token_id'], config_json['max_position_embeddings']) == (
      ['LlamaForCausalLM'], 1, 2048)
  assert 'quantization_config' not in config_json
  back = hf.load_hf(str(out))
  assert back.config == model.config
  jax.tree.map(np.testing.assert_array_equal, back.params, model.params)
  np.testing.assert_array_equal(back.apply_fn(back.params, TOKENS), model.apply_fn(model.params, TOKENS))
  assert back.tokenizer.encode('ab ba').ids == model.tokenizer.encode('ab ba').ids


def test_save_hf_refuses_config_fields_that_change_the_model(tiny, tmp_path):
  model = gguf.load_gguf(tiny[2])
  with pytest.raises(ValueError, match=r"config_fields \['rope_theta'\] change the model.*'rope'"):
    export.save_hf(str(tmp_path / 'x'), model.params, model.config, config_fields={'rope_theta': 1.0})
  assert not (tmp_path / 'x').exists()


def test_decoder_from_gguf_exports_back_to_gguf(tiny, tmp_path):
  _, _, path = tiny
  model = gguf.load_gguf(path)
  out = str(tmp_path / 'back.gguf')
  export.save_gguf(out, model.params, {}, template_gguf=path)
  jax.tree.map(np.testing.assert_array_equal, gguf.load_gguf(out).params, model.params)


def test_untied_output_weight_loads_as_lm_head(tiny, tmp_path):
  config, params, _ = tiny
  head = np.random.default_rng(1).normal(size=(config.vocab_size, config.dim)).astype(np.float32)   # torch layout
  path = str(tmp_path / 'untied.gguf')
  tiny_gguf.write_gguf(path, params, config, extra={'output.weight': head})
  model = gguf.load_gguf(path)
  assert not model.config.tie_embeddings
  np.testing.assert_array_equal(model.params['lm_head']['kernel'], head.T)
  with pytest.raises(ValueError, match='untied output.weight'):
    llama.load_smollm2(path)


@pytest.mark.parametrize('extra, message', [
    ({'general.architecture': 'falcon'},
     r"general.architecture is 'falcon', not supported \(supported: llama, gemma3\)"),
    ({'llama.rope.scaling.type': 'yarn'}, r"llama.rope.scaling.type='yarn' is not implemented"),
    ({'llama.expert_count': 8}, r'llama.expert_count=8 is not implemented'),
])
def test_unsupported_architectures_and_fields_are_refused_before_any_tensor(tiny, extra, message):
  _, meta = gguf.open_gguf(tiny[2], tensors=False)
  with pytest.raises(ValueError, match=re.escape(tiny[2]) + '.*' + message):
    gguf.config_from_gguf({**meta, **extra}, tiny[2])
