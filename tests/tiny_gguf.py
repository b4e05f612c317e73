"""A tiny Llama GGUF as llama.cpp's converter writes it (for loader and GGUF-export tests)."""

import jax
import numpy as np


def get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def tiny_llama(dim=32, ffn_dim=48, head_dim=8, seed=0):
  """(config, params) of a 2-layer Llama with random values of the right shapes (no init: its compile takes s)."""
  from flexround_jax.models import llama  # pylint: disable=g-import-not-at-top
  config = llama.LlamaConfig(vocab_size=64, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=head_dim,
                             ffn_dim=ffn_dim)
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: llama.make_llama(config)[1])
  return config, jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def template(folder):
  """(config, params, path) of a tiny Llama (width 64, weights scaled to 0.05 of init) written as GGUF into
  ``folder``: the source model the export tests quantize and write back."""
  config, params = tiny_llama(dim=64, ffn_dim=96, head_dim=16)
  params = jax.tree.map(lambda a: a * 0.05, params)
  path = str(folder / 'source.gguf')
  write_gguf(path, params, config)
  return config, params, path


def write_gguf(path, params, config, block_count=None, extra=None, drop=None, alignment=None):
  """Writes ``params`` as F32 tensors in torch layout (out, in), q/k rows permuted for adjacent RoPE; tensor data
  aligned to ``alignment`` bytes (general.alignment) if given, else GGUF's default 32."""
  import gguf  # pylint: disable=g-import-not-at-top
  from flexround_jax.models import llama  # pylint: disable=g-import-not-at-top
  heads = {'q_proj': config.n_heads, 'k_proj': config.n_kv_heads}
  writer = gguf.GGUFWriter(path, 'llama')
  if alignment is not None:
    writer.add_custom_alignment(alignment)
  for add, value in [('add_block_count', config.n_layers if block_count is None else block_count),
                     ('add_context_length', config.max_seq_len), ('add_embedding_length', config.dim),
                     ('add_feed_forward_length', config.ffn_dim), ('add_head_count', config.n_heads),
                     ('add_head_count_kv', config.n_kv_heads), ('add_layer_norm_rms_eps', config.norm_eps),
                     ('add_rope_freq_base', config.rope_base), ('add_rope_dimension_count', config.head_dim),
                     ('add_vocab_size', config.vocab_size), ('add_bos_token_id', config.bos_token_id),
                     ('add_eos_token_id', config.eos_token_id),
                     ('add_token_list', ['a', 'b', 'ab'] + [f't{i}' for i in range(3, config.vocab_size)]),
                     ('add_token_merges', ['a b'])]:
    getattr(writer, add)(value)
  for name, param in llama.gguf_tensor_names(config).items():
    w = np.asarray(get(params, param))
    if param[-1] == 'kernel':
      w = w.T if param[-2] not in heads else llama.permute_qk(w.T, heads[param[-2]])
    if name != drop:
      writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
  for name, w in (extra or {}).items():
    writer.add_tensor(name, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()



def tensor_ranges(path):
  """(start of the data section, {tensor name: (first byte, end byte)} of each tensor's data) in the file, as the
  gguf package's reader finds them."""
  import gguf  # pylint: disable=g-import-not-at-top
  reader = gguf.GGUFReader(path, 'r')
  return reader.data_offset, {t.name: (t.data_offset, t.data_offset + t.n_bytes) for t in reader.tensors}


def set_tensor_offset(path, name, offset):
  """Rewrites, in place, the data offset (a uint64 counted from the data section's start) in tensor ``name``'s
  info."""
  import gguf  # pylint: disable=g-import-not-at-top
  reader = gguf.GGUFReader(path, 'r+')
  (tensor,) = [t for t in reader.tensors if t.name == name]
  tensor.field.parts[-1][0] = offset
  reader.data.flush()
