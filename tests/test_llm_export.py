"""A 2-layer Llama: quantize (per-channel and per-group), export packed safetensors, reload: perplexity equal
exactly to the fake-quant model's. Groups of 48 leave a shorter last group (64 = 48 + 16, 128 = 2 x 48 + 32),
as groups of 128 do on SmolLM2's 576-wide inputs."""

import jax
import numpy as np
import pytest

import flexround_jax as fr
from flexround_jax import export
from flexround_jax.evals import perplexity
from flexround_jax.models import llama


@pytest.mark.parametrize('spec', [fr.QuantSpec(bits=4, granularity='per_channel'),
                                  fr.QuantSpec(bits=3, granularity='per_group', group_size=48)])
def test_reloaded_export_has_the_same_perplexity(spec, tmp_path):
  module, params = llama.make_llama(llama.LlamaConfig(), seed=0)
  apply_fn = lambda p, t: module.apply({'params': p}, t)
  rng = np.random.default_rng(0)
  calib = rng.integers(0, 256, (16, 32)).astype(np.int32)
  windows = rng.integers(0, 256, (6, 32)).astype(np.int32)
  cfg = fr.QuantConfig(method='flexround', weight=spec, blocks=r'layers_\d+', iters=20, batch_size=4,
                       progress=False)
  result = fr.quantize(params, apply_fn, calib, cfg)
  assert len(result.qtensors) == 14 and [r['unit'] for r in result.report] == ['layers_0', 'layers_1']
  path = str(tmp_path / 'llama.safetensors')
  sizes = export.save_safetensors(path, result.params, result.qtensors)
  reloaded, qtensors = export.load_safetensors(path)
  for name, qt in result.qtensors.items():
    np.testing.assert_array_equal(qtensors[name].codes, qt.codes)
  fake = perplexity.perplexity(apply_fn, result.params, windows, batch_size=3, progress=False)
  again = perplexity.perplexity(apply_fn, jax.tree.map(np.asarray, reloaded), windows, batch_size=3, progress=False)
  assert again['ppl'] == fake['ppl']
  assert sizes['file_bytes'] < sizes['float32_bytes']
