"""Memory cuts of the SmolLM2 run that keep its results: the activation cache handed from unit to unit without a
copy, and the evaluation without the (batch, T, vocab) logits (equal up to float rounding; opt-in)."""

import numpy as np

from flexround_jax.engine.activations import ActivationStore
from flexround_jax.evals import perplexity
from flexround_jax.models import decoder
from flexround_jax.models.decoder import FULL, SLIDING

import tiny_gguf_gemma3 as tiny


def test_store_holding_arrays_in_ram_takes_them_over_and_copies_them_into_files(tmp_path):
  arrays = [np.arange(12, dtype=np.float32).reshape(4, 3), np.ones((4, 2), np.int32)]
  in_ram = ActivationStore.holding(arrays)
  assert in_ram.n == 4 and all(a is b for a, b in zip(in_ram.arrays, arrays))
  in_files = ActivationStore.holding(arrays, str(tmp_path))
  assert all(isinstance(a, np.memmap) and not np.shares_memory(a, b) for a, b in zip(in_files.arrays, arrays))
  for a, b in zip(in_files.arrays, arrays):
    np.testing.assert_array_equal(a, b)
  in_files.close()


def test_perplexity_through_the_chunked_vocabulary_equals_the_logits():
  config = tiny.tiny_config(num_layers=2, vocab_size=320, layer_types=(SLIDING, FULL))
  params = tiny.tiny_params(config)
  module = decoder.Decoder(config)
  apply_fn = lambda p, tokens: module.apply({'params': p}, tokens)
  windows = np.random.default_rng(3).integers(0, config.vocab_size, (5, 9)).astype(np.int32)
  for first in (0, 4):
    full = perplexity.perplexity(apply_fn, params, windows, batch_size=2, progress=False, first=first)
    chunked = perplexity.perplexity(apply_fn, params, windows, batch_size=2, progress=False, first=first,
                                    nll_fn=perplexity.decoder_window_nll(module, 64, first))
    assert chunked['n_tokens'] == full['n_tokens']
    np.testing.assert_allclose(chunked['nll'], full['nll'], rtol=1e-5)
