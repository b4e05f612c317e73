"""``load_hf(path, stream=True)``: bfloat16 checkpoints kept memory-mapped as stored, computed in float32, with the
same logits as the eager float32 load, and quantized by the engine from the maps (benchmarks/bench_stream_hf.py
measures the 7B-shaped case). ``weights.release_pages``: dropping a map's pages never changes its values."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexround_jax as fr
from flexround_jax import weights
from flexround_jax.engine import plan
from flexround_jax.models import decoder, load_hf

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf')


def _bf16_copy(tmp_path, family):
  """A bfloat16 copy of a fixture checkpoint (as most published ones are stored)."""
  src = os.path.join(FIXTURES, family)
  folder = tmp_path / family
  folder.mkdir()
  shutil.copy(os.path.join(src, 'config.json'), folder)
  stored = weights.load_params(os.path.join(src, 'model.safetensors'))
  weights.save_params(str(folder / 'model.safetensors'), {k: np.asarray(v, jnp.bfloat16) for k, v in stored.items()})
  return folder


def _tokens(family):
  return jnp.asarray(np.load(os.path.join(FIXTURES, family, 'reference.npz'))['tokens'])


@pytest.mark.parametrize('family', ['llama', 'gemma3'])   # untied head; tied head, embedding scale, (1 + w) norms
def test_stream_keeps_maps_and_gives_the_eager_logits(tmp_path, family):
  folder = _bf16_copy(tmp_path, family)
  eager, lazy = load_hf(folder), load_hf(folder, stream=True)
  assert all(isinstance(x, np.memmap) and x.dtype == jnp.bfloat16 for x in jax.tree.leaves(lazy.params))
  tokens = _tokens(family)
  want = np.asarray(eager.apply_fn(eager.params, tokens))
  got = lazy.apply_fn(lazy.params, tokens)   # eager: each layer's pages are released after it ran
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.jit(lazy.apply_fn)(lazy.params, tokens), want, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(lazy.params), jax.tree.leaves(eager.params)):   # released maps read back equal
    np.testing.assert_array_equal(np.asarray(a, np.float32), b)
  kept = load_hf(folder, dtype=None, stream=True)   # computes in the stored dtype
  assert kept.apply_fn(kept.params, tokens).dtype == jnp.float32
  assert np.max(np.abs(np.asarray(kept.apply_fn(kept.params, tokens)) - want)) > 0   # bfloat16 math differs


def test_stream_quantizes_from_the_maps(tmp_path):
  """The engine quantizes the memory-mapped bfloat16 params (each unit computes in float32, its fake-quant kernels
  rounded to bfloat16): the same units and kernels as from the eager float32 load, and losses close to its."""
  folder = _bf16_copy(tmp_path, 'llama')
  eager, lazy = load_hf(folder), load_hf(folder, stream=True)
  calib = np.random.default_rng(0).integers(3, 250, (4, 16)).astype(np.int32)
  config = fr.QuantConfig(method='flexround', weight=fr.QuantSpec(bits=4, granularity='per_channel'),
                          blocks=decoder.BLOCK_REGEX, iters=2, batch_size=2, progress=False,
                          rules=[fr.Rule('lm_head', skip=True)], spill_dir=str(tmp_path / 'spill'))
  got = fr.quantize(lazy.params, lazy.apply_fn, calib, config)
  want = fr.quantize(eager.params, eager.apply_fn, calib, config)
  assert [r['unit'] for r in got.report] == ['layers_0', 'layers_1'] and set(got.qtensors) == set(want.qtensors)
  for r, s in zip(got.report, want.report):
    assert r['loss_final'] <= r['loss_rtn'] and np.isclose(r['loss_rtn'], s['loss_rtn'], rtol=0.05)
  for name, qt in got.qtensors.items():   # same grids from the same weights: the codes barely differ
    assert np.mean(np.asarray(qt.codes) != np.asarray(want.qtensors[name].codes)) < 0.02, name
  logits = np.asarray(lazy.apply_fn(got.params, calib[:1]))
  assert np.isfinite(logits).all()


def test_release_pages_keeps_values(tmp_path):
  path = str(tmp_path / 'w.safetensors')
  x = np.random.default_rng(0).standard_normal((300, 500)).astype(jnp.bfloat16)
  weights.save_params(path, {'a': {'kernel': x}, 'b': np.ones(3, np.float32)})
  tree = weights.load_params(path)
  tree['a']['kernel'] = tree['a']['kernel'].T   # a view of the map, as load_hf's kernels
  assert plan.host_finite_and_peak(tree['a']['kernel']) == (True, np.abs(x.astype(np.float32)).max())
  weights.release_pages({**tree, 'host': np.zeros(2)})   # a host array is left alone
  weights.release_pages(tree['b'])
  np.testing.assert_array_equal(tree['a']['kernel'], x.T)
  np.testing.assert_array_equal(tree['b'], np.ones(3))
