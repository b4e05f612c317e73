"""A tiny Gemma 3 GGUF as llama.cpp's converter writes it (``gemma3`` keys, norms stored + 1, a SentencePiece vocab)."""

import numpy as np

from tiny_gguf import get

# A SentencePiece vocabulary: control tokens, byte fallback, normal pieces with distinct descending scores (the
# merge order), and user-defined runs of newlines / spaces that llama.cpp matches whole.
SPECIAL = ['<pad>', '<eos>', '<bos>', '<unk>']
PIECES = ['\u2581', 'a', 'b', 'c', 'ab', 'bc', 'abc', '\u2581a', '\u2581ab', '\u2581abc', 'ca', 'cab', '\u2581\u2581']
USER_DEFINED = ['\n', '\n\n', '  ', '   ']


def tiny_vocab(vocab_size):
  """(tokens, scores, token types) of ``vocab_size`` entries (padded with unused normal pieces)."""
  tokens = SPECIAL + [f'<0x{b:02X}>' for b in range(256)] + PIECES + USER_DEFINED
  tokens += [f'<unused{i}>' for i in range(vocab_size - len(tokens))]
  types, scores = [], []
  for i, t in enumerate(tokens):
    if t in SPECIAL or t.startswith('<unused'):
      types.append(3), scores.append(-1000.0)
    elif t.startswith('<0x'):
      types.append(6), scores.append(0.0)
    elif t in USER_DEFINED:
      types.append(4), scores.append(-1000.0)
    else:
      types.append(1), scores.append(-float(i))
  return tokens, scores, types


def tiny_config(num_layers=7, **overrides):
  """The ``DecoderConfig`` a tiny gemma3 GGUF written by ``write_gguf`` with these sizes must load as."""
  from flexround_jax.models.decoder import FULL, SLIDING, DecoderConfig, Rope  # pylint: disable=g-import-not-at-top
  kw = dict(vocab_size=300, hidden_size=32, num_layers=num_layers, num_heads=4, num_kv_heads=1, head_dim=16,
            intermediate_size=48, norm_eps=float(np.float32(1e-6)), norm_unit_offset=True, sandwich_norms=True,
            qk_norm=True, activation='gelu_pytorch_tanh', embed_scale=True, tie_embeddings=True,
            rope=Rope(base=1e6), rope_local=Rope(base=1e4), sliding_window=4,
            layer_types=tuple(FULL if i % 6 == 5 else SLIDING for i in range(num_layers)),
            query_pre_attn_scalar=16.0, model_type='gemma3_text')
  kw.update(overrides)
  return DecoderConfig(**kw)


def tiny_params(config, seed=0):
  """Random params of ``Decoder(config)`` (norm scales on a 1/64 grid, so stored + 1 - 1 round-trips exactly)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flexround_jax.models import decoder  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: decoder.make_decoder(config)[1])
  return jax.tree.map(lambda s: np.round(rng.normal(size=s.shape) * 0.3 * 64).astype(np.float32) / 64, shapes)


def write_gguf(path, params, config, arch='gemma3', extra_meta=None, drop=None, extra_tensors=None):
  """Writes ``params`` of ``Decoder(config)`` as a gemma3 GGUF: F32 tensors in torch layout with llama.cpp's names,
  norm scales + 1 (``_gguf_gemma3.from_param``), and the metadata llama.cpp's converter writes (no sliding-window
  pattern or local RoPE base: llama.cpp's defaults apply). ``extra_meta``: {key: (writer method, value)}."""
  import gguf  # pylint: disable=g-import-not-at-top
  from flexround_jax.models import _gguf_gemma3  # pylint: disable=g-import-not-at-top
  writer = gguf.GGUFWriter(path, arch)
  tokens, scores, types = tiny_vocab(config.vocab_size)
  for add, value in [('add_block_count', config.num_layers), ('add_context_length', 128),
                     ('add_embedding_length', config.hidden_size),
                     ('add_feed_forward_length', config.intermediate_size), ('add_head_count', config.num_heads),
                     ('add_head_count_kv', config.num_kv_heads), ('add_key_length', config.head_dim),
                     ('add_value_length', config.head_dim), ('add_layer_norm_rms_eps', config.norm_eps),
                     ('add_rope_freq_base', config.rope.base), ('add_sliding_window', config.sliding_window),
                     ('add_tokenizer_model', 'llama'), ('add_tokenizer_pre', 'default'), ('add_token_list', tokens),
                     ('add_token_scores', scores), ('add_token_types', types), ('add_bos_token_id', 2),
                     ('add_eos_token_id', 1), ('add_unk_token_id', 3), ('add_pad_token_id', 0),
                     ('add_add_bos_token', True), ('add_add_space_prefix', False)]:
    getattr(writer, add)(value)
  for key, (method, value) in (extra_meta or {}).items():
    getattr(writer, method)(key, value)
  for name, param in _gguf_gemma3.tensor_names(config).items():
    if name != drop:
      w = _gguf_gemma3.from_param(np.asarray(get(params, param)), param)
      writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
  for name, w in (extra_tensors or {}).items():
    writer.add_tensor(name, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
