"""MiniLM-L6 (all-MiniLM-L6-v2, BERT architecture, pretrained) as a quantization task.

Calibration: ``n_calib`` Wikipedia sentences from the calibration articles (``data.sentences``), one per sequence,
padded to ``calib_len`` tokens. Evaluation: SimLex-999 and WordSim-353 Spearman of word-embedding cosines with
human scores, and the mean cosine between float and quantized sentence embeddings of ``n_eval`` held-out
sentences (from the evaluation articles). Blocks: the six encoder layers; embeddings and LayerNorms stay float.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from flexround_jax.data import sentences
from flexround_jax.evals import sentence_cosine, word_similarity
from flexround_jax.models import bert
from flexround_jax.tasks import Task


@functools.lru_cache(maxsize=4)
def _fp_embeddings(n_eval: int) -> np.ndarray:
  _, params, config = bert.load_minilm()
  return bert.text_embedder(params, config)(sentences.evaluation_sentences(n_eval))


def make(args) -> Task:
  n_calib, calib_len = args.get('n_calib', 512), args.get('calib_len', 64)
  n_eval = args.get('n_eval', 1000)
  _, params, config = bert.load_minilm()
  calib = bert.encode(sentences.calibration_sentences(n_calib), calib_len)
  eval_texts = sentences.evaluation_sentences(n_eval)

  def apply_fn(p, batch):
    return bert.embed(p, batch, config)

  def evaluate(p, forward=None) -> dict:
    embed_texts = bert.text_embedder(p, config, embed_fn=None if forward is None else jax.jit(forward))
    metrics = word_similarity.word_similarity(embed_texts)
    metrics['mean_cosine'] = float(np.mean(sentence_cosine.cosines(_fp_embeddings(n_eval), embed_texts(eval_texts))))
    return metrics

  return Task('minilm', params, apply_fn, calib, evaluate, blocks=r'encoder/layer_\d+',
              notes=f'all-MiniLM-L6-v2; calibration {n_calib} Wikipedia sentences (articles[:80]) padded to '
                    f'{calib_len} tokens; mean_cosine over {n_eval} sentences of articles[80:]')
