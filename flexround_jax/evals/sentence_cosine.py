"""Agreement of two embedding models (e.g. float and quantized) on the same inputs: mean cosine of their outputs."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise cosine of a, b (N, D): (N,) float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f'expected two (N, D) arrays of one shape, got {a.shape} and {b.shape}')
  return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def mean_cosine(embed_a: Callable[[Any], np.ndarray], embed_b: Callable[[Any], np.ndarray],
                batches: Iterable[Any]) -> float:
  """Mean over all rows of cos(embed_a(batch), embed_b(batch)); each call returns (B, D).

  ``batches`` yields whatever both functions take: lists of texts for ``bert.text_embedder`` functions, or batch
  dicts for ``lambda b: bert.embed(params, b)``. Every row counts once, whatever the batch sizes.
  """
  cos = [cosines(embed_a(batch), embed_b(batch)) for batch in batches]
  if not cos:
    raise ValueError('batches is empty')
  return float(np.concatenate(cos).mean())
