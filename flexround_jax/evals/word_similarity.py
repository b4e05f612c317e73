"""Word similarity: Spearman correlation between embedding cosines and human scores on SimLex-999 and WordSim-353.

Both sets ship with gensim's test data (``simlex999.txt``: 999 pairs, ``wordsim353.tsv``: 353 pairs; tab-separated
``word1 word2 score``, ``#`` comments). Each word is embedded on its own, as a one-word sentence.
all-MiniLM-L6-v2 in float32 scores 0.446 (SimLex-999) and 0.729 (WordSim-353).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from flexround_jax import _extras
from flexround_jax.data import wiki

DATASETS = {'simlex999': 'simlex999.txt', 'wordsim353': 'wordsim353.tsv'}


def load_pairs(name: str) -> tuple[list[tuple[str, str]], np.ndarray]:
  """The word pairs and human scores (N,) float64 of ``name`` in DATASETS, in file order."""
  if name not in DATASETS:
    raise ValueError(f'unknown word-similarity set {name!r}; known: {sorted(DATASETS)}')
  pairs, scores = [], []
  with open(os.path.join(wiki.gensim_test_data_dir(), DATASETS[name]), encoding='utf-8') as f:
    for line in f:
      if not line.strip() or line.startswith('#'):
        continue
      w1, w2, score = line.rstrip('\n').split('\t')[:3]
      pairs.append((w1, w2))
      scores.append(float(score))
  return pairs, np.asarray(scores)


def spearman(embeddings: dict[str, np.ndarray], pairs: Sequence[tuple[str, str]], scores: np.ndarray) -> float:
  """Spearman rho between cos(embeddings[w1], embeddings[w2]) and the human scores."""
  a = np.stack([embeddings[w1] for w1, _ in pairs]).astype(np.float64)
  b = np.stack([embeddings[w2] for _, w2 in pairs]).astype(np.float64)
  cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  stats = _extras.require('scipy.stats', 'data', 'Spearman correlation')
  return float(stats.spearmanr(cos, scores).statistic)


def word_similarity(embed_texts: Callable[[Sequence[str]], np.ndarray],
                    datasets: Sequence[str] = tuple(DATASETS), limit: int | None = None) -> dict[str, float]:
  """{dataset: Spearman rho} for an embedding function ``embed_texts(list of N words) -> (N, D)``.

  Works for any model or params (float or quantized); embeddings need not be normalised. ``limit`` keeps only the
  first pairs of each set (for quick tests). Each distinct word is embedded once.
  """
  loaded = {}
  for name in datasets:
    pairs, scores = load_pairs(name)
    loaded[name] = (pairs[:limit], scores[:limit])
  words = sorted({w for pairs, _ in loaded.values() for pair in pairs for w in pair})
  vectors = np.asarray(embed_texts(words))
  embeddings = dict(zip(words, vectors))
  return {name: spearman(embeddings, pairs, scores) for name, (pairs, scores) in loaded.items()}
