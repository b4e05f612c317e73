"""evals.perplexity.paired_nll_difference: the paired standard error of a difference in mean NLL."""

import math

import numpy as np
import pytest

from flexround_jax.evals import perplexity


def test_paired_difference_matches_its_definition():
  rng = np.random.default_rng(0)
  difficulty = rng.normal(3.0, 0.5, 400)          # shared by both models: cancels in the paired difference
  a = difficulty + rng.normal(0, 0.01, 400)
  b = difficulty + 0.05 + rng.normal(0, 0.01, 400)
  out = perplexity.paired_nll_difference(a, b)
  d = b - a
  assert out['n'] == 400
  assert out['diff'] == pytest.approx(np.mean(d))
  assert out['se'] == pytest.approx(np.std(d, ddof=1) / 20)
  assert out['ppl_ratio'] == pytest.approx(math.exp(np.mean(b)) / math.exp(np.mean(a)))
  assert out['se'] < 0.1 * np.std(a, ddof=1) / 20   # far below the unpaired error of either mean
  assert perplexity.paired_nll_difference(b, a)['diff'] == pytest.approx(-out['diff'])


def test_paired_difference_rejects_unmatched_windows():
  with pytest.raises(ValueError, match='same N'):
    perplexity.paired_nll_difference(np.zeros(3), np.zeros(4))
  with pytest.raises(ValueError, match='same N'):
    perplexity.paired_nll_difference(np.zeros(1), np.zeros(1))
