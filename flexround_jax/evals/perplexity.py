"""Perplexity of a causal language model on the held-out Wikipedia articles, with one fixed protocol.

Protocol (``evaluation_windows``): the 25 evaluation articles ``wiki.evaluation_articles()`` are joined with
``"\\n\\n"``, tokenized once without special tokens, and cut into non-overlapping 512-token windows, dropping the
remainder (359 windows with the SmolLM2 tokenizer). Each window is scored alone: tokens 1..511 are predicted from
the preceding tokens of the same window, and perplexity = exp(mean NLL over all predicted tokens).
Calibration sequences (``calibration_tokens``) come the same way from ``wiki.calibration_articles()`` only.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from flexround_jax.data import wiki

SEQ_LEN = 512
ARTICLE_SEPARATOR = '\n\n'


def token_windows(token_ids, seq_len: int = SEQ_LEN) -> np.ndarray:
  """Token ids (N,) -> (N // seq_len, seq_len) int32 non-overlapping windows; the remainder is dropped."""
  ids = np.asarray(token_ids, np.int32)
  n = len(ids) // seq_len
  return ids[:n * seq_len].reshape(n, seq_len)


@functools.lru_cache(maxsize=1)
def _default_tokenizer():
  from flexround_jax.models import gguf  # pylint: disable=g-import-not-at-top
  return gguf.load_smollm2_tokenizer()


@functools.lru_cache(maxsize=4)
def _tokenize_articles(texts: tuple[str, ...], tokenizer) -> np.ndarray:
  """Articles joined with "\\n\\n", tokenized once without special tokens -> (N,) int32 (read-only, cached)."""
  tokenizer = tokenizer or _default_tokenizer()
  ids = np.asarray(tokenizer.encode(ARTICLE_SEPARATOR.join(texts), add_special_tokens=False).ids, np.int32)
  ids.setflags(write=False)
  return ids


def evaluation_windows(tokenizer=None, seq_len: int = SEQ_LEN) -> np.ndarray:
  """(359, 512) int32 windows of the evaluation articles; ``tokenizer`` defaults to SmolLM2's (a ``tokenizers``
  Tokenizer, or anything with ``encode(text, add_special_tokens=False).ids``)."""
  return token_windows(_tokenize_articles(wiki.evaluation_articles(), tokenizer), seq_len).copy()


def calibration_tokens(n_seqs: int = 128, seq_len: int = SEQ_LEN, tokenizer=None) -> np.ndarray:
  """(n_seqs, seq_len) int32: the first ``n_seqs`` non-overlapping windows of the calibration articles joined with
  ``"\\n\\n"`` and tokenized once without special tokens (same recipe as ``evaluation_windows``)."""
  windows = token_windows(_tokenize_articles(wiki.calibration_articles(), tokenizer), seq_len)
  if n_seqs > len(windows):
    raise ValueError(f'calibration_tokens: n_seqs={n_seqs} exceeds the {len(windows)} windows of length {seq_len}')
  return windows[:n_seqs].copy()


def llama_cpp_windows(token_ids, bos: int, seq_len: int = SEQ_LEN) -> np.ndarray:
  """(N, seq_len) int32 chunks of [bos] + token_ids, each chunk's first token replaced by bos: the windows
  ``llama-perplexity -c seq_len`` (and ``llama-imatrix``) build for a model whose GGUF sets ``add_bos_token``."""
  windows = token_windows(np.concatenate([[bos], np.asarray(token_ids, np.int32)]), seq_len)
  windows[:, 0] = bos
  return windows


def llama_cpp_evaluation_windows(tokenizer, bos: int, seq_len: int = SEQ_LEN) -> np.ndarray:
  """``llama_cpp_windows`` of the evaluation text (the articles of ``evaluation_windows`` joined the same way);
  345 windows with Gemma 3's tokenizer."""
  return llama_cpp_windows(_tokenize_articles(wiki.evaluation_articles(), tokenizer), bos, seq_len)


def llama_cpp_calibration_tokens(n_seqs: int, bos: int, seq_len: int = SEQ_LEN, tokenizer=None) -> np.ndarray:
  """``calibration_tokens`` cut as ``llama_cpp_windows`` (bos first in every window): the first ``n_seqs``."""
  windows = llama_cpp_windows(_tokenize_articles(wiki.calibration_articles(), tokenizer), bos, seq_len)
  if n_seqs > len(windows):
    raise ValueError(f'llama_cpp_calibration_tokens: n_seqs={n_seqs} exceeds the {len(windows)} windows of length '
                     f'{seq_len}')
  return windows[:n_seqs].copy()


def window_nll(logits, tokens, first: int = 0):
  """Summed NLL of tokens[:, first+1:] given logits[:, first:-1]; logits (B, T, V), tokens (B, T) -> (B,) float32."""
  logits = logits[:, first:-1].astype(jnp.float32)
  target = tokens[:, first + 1:]
  picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
  return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - picked, axis=-1)


@functools.lru_cache(maxsize=8)
def _jitted_nll(apply_fn, first: int = 0):
  return jax.jit(lambda params, tokens: window_nll(apply_fn(params, tokens), tokens, first))


def decoder_token_nll(module, vocab_chunk: int = 16384, first: int = 0):
  """jit((params, tokens (B, T) int) -> (B, T - 1 - first) float32 NLL of tokens first+1..T-1) for a
  ``models.decoder.Decoder`` with tied embeddings, without forming the (B, T, vocab) logits (Gemma 3: 512 MB per
  512-token window).

  The decoder runs up to its final norm (captured; the unused LM head is dead code under jit); only the positions
  that predict a scored token (``first``..T-2) go on: the logsumexp over the tied embedding (vocab, d) runs in
  ``vocab_chunk``-row steps (one step if vocab is not a multiple), and the target logit is h . embedding[target].
  ``first = T // 2`` is llama.cpp's scoring (the second half of each chunk) at about half the head's cost. Equal to
  ``window_nll(logits, tokens, first)`` on the full logits up to float rounding.
  """

  def fn(params, tokens):
    if not 0 <= first < tokens.shape[1] - 1:
      raise ValueError(f'decoder_token_nll: first={first} must be in [0, {tokens.shape[1] - 2}] for windows of '
                       f'{tokens.shape[1]} tokens')
    _, state = module.apply({'params': params}, tokens, capture_intermediates=lambda m, _: m.name == 'norm')
    h = state['intermediates']['norm']['__call__'][0][:, first:-1].astype(jnp.float32)  # (B, T-1-first, d)
    emb = params['embed_tokens']['embedding'].astype(jnp.float32)                         # (V, d)
    vocab, d = emb.shape
    chunk = vocab_chunk if vocab % vocab_chunk == 0 else vocab

    def step(carry, e):
      m, s = carry
      z = h @ e.T                                                                          # (B, T-1-first, chunk)
      m_new = jnp.maximum(m, z.max(-1))
      return (m_new, s * jnp.exp(m - m_new) + jnp.exp(z - m_new[..., None]).sum(-1)), None

    init = (jnp.full(h.shape[:2], -jnp.inf, jnp.float32), jnp.zeros(h.shape[:2], jnp.float32))
    (m, s), _ = jax.lax.scan(step, init, emb.reshape(vocab // chunk, chunk, d))
    return m + jnp.log(s) - jnp.sum(h * emb[tokens[:, first + 1:]], -1)

  return jax.jit(fn)


def decoder_window_nll(module, vocab_chunk: int = 16384, first: int = 0):
  """jit((params, tokens (B, T) int) -> (B,) summed NLL of tokens first+1..T-1): ``window_nll`` of a tied-embedding
  ``Decoder`` through ``decoder_token_nll`` (the (B, T, vocab) logits never formed), for ``perplexity(nll_fn=)``."""
  token_nll = decoder_token_nll(module, vocab_chunk, first)   # only the scored positions reach the head
  return jax.jit(lambda params, tokens: jnp.sum(token_nll(params, tokens), axis=-1))


def perplexity(apply_fn, params, windows, batch_size: int = 4, max_windows: int | None = None,
               progress: bool = True, first: int = 0, nll_fn=None) -> dict:
  """exp(mean NLL) over every window's tokens 1..T-1, each window scored alone.

  Args:
    apply_fn: ``(params, tokens (B, T) int32) -> logits (B, T, vocab)``, causal.
    params: passed to ``apply_fn`` unchanged.
    windows: (N, T) int token windows, e.g. ``evaluation_windows()``.
    batch_size: windows per jitted call; the last batch is zero-padded so one shape is compiled.
    max_windows: score only the first ``max_windows`` windows.
    progress: show a tqdm bar.
    first: score only tokens first+1..T-1 of each window (llama.cpp's ``llama-perplexity`` scores the second half:
      ``first = T // 2``); the default scores every token after the first.
    nll_fn: ``(params, tokens (B, T)) -> (B,)`` summed NLL of tokens first+1..T-1 in place of ``window_nll`` of
      ``apply_fn``'s logits (``decoder_window_nll``: without the (B, T, vocab) logits; ``apply_fn`` is then unused).

  Returns:
    dict with ``ppl``, ``nll`` (mean per token), ``n_windows`` and ``n_tokens`` (predicted tokens).
  """
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  windows = np.asarray(windows, np.int32)
  if windows.ndim != 2 or windows.shape[1] < 2:
    raise ValueError(f'perplexity: windows must be (N, T) with T >= 2, got shape {windows.shape}')
  if max_windows is not None:
    windows = windows[:max_windows]
  n, t = windows.shape
  if not 0 <= first < t - 1:
    raise ValueError(f'perplexity: first={first} must be in [0, {t - 2}] for windows of {t} tokens')
  nll_fn = nll_fn or _jitted_nll(apply_fn, first)
  total = 0.0
  for start in tqdm(range(0, n, batch_size), desc='perplexity', unit='batch', disable=not progress):
    batch = windows[start:start + batch_size]
    real = len(batch)
    if real < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - real, t), np.int32)])
    total += float(np.sum(np.asarray(nll_fn(params, batch), np.float64)[:real]))
  n_tokens = n * (t - 1 - first)
  mean_nll = total / n_tokens
  return {'ppl': math.exp(mean_nll), 'nll': mean_nll, 'n_windows': n, 'n_tokens': n_tokens}


def window_nll_sums(nll_fn, params, windows, batch_size: int = 4, progress: bool = True) -> np.ndarray:
  """(N,) float64: ``nll_fn(params, batch (B, T) int32) -> (B,) summed NLL per window`` over ``windows`` (N, T),
  ``batch_size`` windows per call; the last batch is zero-padded so one shape is compiled. ``perplexity``'s loop
  with every window's sum kept (for paired comparisons, ``paired_nll_difference``)."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  windows = np.asarray(windows, np.int32)
  n, t = windows.shape
  sums = []
  for start in tqdm(range(0, n, batch_size), desc='perplexity', unit='batch', disable=not progress):
    batch = windows[start:start + batch_size]
    real = len(batch)
    if real < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - real, t), np.int32)])
    sums.append(np.asarray(nll_fn(params, batch), np.float64)[:real])
  return np.concatenate(sums) if sums else np.zeros((0,), np.float64)


def paired_nll_difference(nll_a, nll_b) -> dict:
  """Mean NLL of ``b`` minus that of ``a`` on the same windows, with its paired standard error.

  Args:
    nll_a, nll_b: (N,) mean NLL per window (or per llama.cpp chunk) of two models on the same N windows, in the same
      order, every window scoring the same number of tokens (then the mean over windows is the mean over tokens).

  Returns:
    dict with ``diff`` (mean of d = nll_b - nll_a; > 0: ``b`` is worse), ``se`` (std(d, ddof=1) / sqrt(N), the
    standard error of ``diff`` over windows, which cancels the windows' shared difficulty), ``ppl_ratio``
    (exp(diff) = ppl_b / ppl_a) and ``n``.
  """
  a, b = np.asarray(nll_a, np.float64), np.asarray(nll_b, np.float64)
  if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
    raise ValueError(f'paired_nll_difference: need two (N,) arrays of the same N >= 2, got {a.shape} and {b.shape}')
  d = b - a
  diff = float(np.mean(d))
  return {'diff': diff, 'se': float(np.std(d, ddof=1) / math.sqrt(len(d))), 'ppl_ratio': math.exp(diff), 'n': len(d)}
