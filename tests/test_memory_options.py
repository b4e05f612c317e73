"""Memory cuts of the SmolLM2 run: the activation cache handed from unit to unit without a copy (same results), and,
opt-in, the evaluation without the (batch, T, vocab) logits (equal up to float rounding) and a bfloat16 activation
cache (QuantConfig.cache_dtype: half the cache, nearly the float32 codes)."""

import jax.numpy as jnp
import numpy as np
import pytest

import flexround_jax as fr
from flexround_jax.engine.activations import ActivationStore
from flexround_jax.evals import perplexity
from flexround_jax.models import decoder
from flexround_jax.models.decoder import FULL, SLIDING

import tiny_gguf_gemma3 as tiny
import tiny_models


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


def test_bfloat16_cache_stores_half_and_reads_back_float32():
  from flexround_jax.engine.activations import Placement   # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).normal(size=(4, 3, 8)).astype(np.float32)
  positions = np.arange(12, dtype=np.int32).reshape(4, 3)
  store = ActivationStore.from_arrays([x, positions], dtype='bfloat16')
  assert store.arrays[0].dtype == jnp.bfloat16 and store.arrays[1].dtype == np.int32
  assert store.nbytes == x.nbytes // 2 + positions.nbytes
  local = Placement(batch_size=2, num_devices=1).local(list(store.arrays))
  assert local[0].dtype == jnp.float32 and local[1].dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(local[0]), x.astype(jnp.bfloat16).astype(np.float32))   # nearest
  np.testing.assert_allclose(np.asarray(local[0]), x, rtol=2 ** -8)


def _mlp(cache_dtype, **kw):
  params, apply_fn, calib = tiny_models.mlp()
  config = fr.QuantConfig(method=fr.methods.flexround(lr=5e-3), weight=fr.QuantSpec(bits=4, granularity='per_channel'),
                          blocks=r'block_\d+', iters=40, batch_size=16, progress=False, cache_dtype=cache_dtype, **kw)
  return fr.quantize(params, apply_fn, calib, config)


def test_bfloat16_cache_plans_half_the_memory_and_gives_nearly_the_float32_codes():
  plans = {dtype: _mlp(dtype, dry_run=True).plan for dtype in ('float32', 'bfloat16')}
  for a, b in zip(plans['float32'], plans['bfloat16']):
    assert b['activation_bytes'] * 2 == a['activation_bytes']
  f32, bf16, reseeded = _mlp('float32'), _mlp('bfloat16'), _mlp('float32', seed=1)
  changed = lambda a, b: np.mean([np.mean(np.asarray(a.qtensors[n].codes) != np.asarray(b.qtensors[n].codes))
                                  for n in a.qtensors])
  # learned rounding is trajectory-dependent: bfloat16-rounded inputs and targets move fewer codes (6.5 % here)
  # than another minibatch seed does
  assert changed(f32, bf16) <= changed(f32, reseeded)
  total = lambda result: sum(u['loss_final'] for u in result.report)
  assert total(bf16) == pytest.approx(total(f32), rel=0.15)
  for u in bf16.report:
    assert np.isfinite(u['loss_final']) and u['loss_final'] <= u['loss_rtn'] and not u['fell_back_to_rtn']


def test_planning_keeps_no_output_inside_a_block_and_plans_the_same_units(monkeypatch):
  from flexround_jax.engine import activations, graph, plan as plan_lib   # pylint: disable=g-import-not-at-top
  params, apply_fn, calib = tiny_models.mlp()
  calib = activations.as_arrays(calib)
  config = fr.QuantConfig(blocks=r'block_\d+', iters=2, batch_size=8, progress=False)
  calls, _ = graph.trace_calls(apply_fn, params, calib[:2],
                               keep_output=lambda path: not plan_lib._inside_a_block(path, config.blocks))
  inner = [c for c in calls if c.path.startswith('block_') and '/' in c.path]
  assert inner and all(c.output is None for c in inner)
  assert all(c.output is not None for c in calls if not (c.path.startswith('block_') and '/' in c.path))
  frugal = plan_lib.plan_units(apply_fn, params, calib, config)
  monkeypatch.setattr(plan_lib, '_inside_a_block', lambda path, blocks: False)   # every output kept, as before
  full = plan_lib.plan_units(apply_fn, params, calib, config)
  key = lambda u: (u.name, u.kind, u.batched, u.chain_from_previous, u.input_groups, u.call_order,
                   [k.module for k in u.kernels])
  assert [key(u) for u in frugal] == [key(u) for u in full]


def test_to_device_converts_leaf_by_leaf_and_empties_the_host_tree():
  import jax   # pylint: disable=g-import-not-at-top
  from flexround_jax import weights   # pylint: disable=g-import-not-at-top
  host = {'a': {'kernel': np.arange(6, dtype=np.float32).reshape(2, 3)}, 'b': np.ones(3, np.int32)}
  expected = jax.tree.map(np.copy, host)
  out = weights.to_device(host)
  assert host == {} and jax.tree.structure(out) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
    assert isinstance(got, jax.Array) and got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), want)
