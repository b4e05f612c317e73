"""SmolLM2-135M-Instruct (Llama architecture, from its Q4_1 GGUF file, as ``models.decoder.Decoder``) as a
quantization task.

The GGUF weights are already on a 4-bit grid (Q4_1, groups of 32): the dequantized model is this task's float
baseline, and every result says so. Calibration: ``n_calib`` non-overlapping ``calib_len``-token windows of the
calibration articles (``wiki.calibration_articles()``). Evaluation: perplexity on the fixed protocol of
``evals.perplexity`` (the 25 evaluation articles, 359 windows of 512 tokens; ``max_windows`` scores a prefix).
Blocks: the 30 decoder layers (q, k, v, o, gate, up, down kernels); embeddings (tied LM head) and RMSNorms float.
``eval_batch``: windows per evaluation call (4); ``vocab_chunk``: score through ``perplexity.decoder_window_nll``
in steps of that many vocabulary rows instead of forming the (eval_batch, 512, 49152) logits (equal up to float
rounding; None, the default: the logits).
"""

from __future__ import annotations

from flexround_jax import weights
from flexround_jax.evals import perplexity
from flexround_jax.models import gguf
from flexround_jax.tasks import Task


def make(args) -> Task:
  n_calib, calib_len = args.get('n_calib', 128), args.get('calib_len', 512)
  max_windows = args.get('max_windows', None)
  vocab_chunk = args.get('vocab_chunk', None)
  model = gguf.load_smollm2()
  params, apply_fn = weights.to_device(model.params), model.apply_fn   # the host copy goes leaf by leaf
  calib = perplexity.calibration_tokens(n_calib, calib_len, model.tokenizer)
  windows = perplexity.evaluation_windows(model.tokenizer)
  chunked = perplexity.decoder_window_nll(model.module, vocab_chunk) if vocab_chunk else None

  def evaluate(p, forward=None) -> dict:
    return perplexity.perplexity(forward or apply_fn, p, windows, batch_size=args.get('eval_batch', 4),
                                 max_windows=max_windows, nll_fn=None if forward else chunked)

  return Task('smollm2', params, apply_fn, calib, evaluate, blocks=r'layers_\d+',
              notes=f'SmolLM2-135M-Instruct from its Q4_1 GGUF: the "float" baseline is the dequantized Q4_1 model. '
                    f'Calibration {n_calib} x {calib_len} tokens of articles[:80]; perplexity on articles[80:] '
                    f'({"all 359" if max_windows is None else max_windows} windows of 512 tokens).')
