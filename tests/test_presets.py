"""Presets: every name builds a valid QuantConfig, the CLI's --scheme writes the same fields as fr.preset, and
GGUF-Q4_0 yields exactly the grid the GGUF Q4_0 export stores."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import flexround_jax as fr
from flexround_jax import config_base, export, run
from flexround_jax.quantizers import activation as act_lib

import tiny_gguf

TOY_CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'toy_mlp.py')


@pytest.mark.parametrize('name', list(fr.presets.PRESETS))
def test_every_preset_builds_a_valid_quant_config(name):
  p = fr.presets.PRESETS[name]
  assert p.description and set(p.fields) == {'weight', 'activation', 'method'}
  config = fr.preset(name)
  assert isinstance(config, fr.QuantConfig) and config.weight == p.fields['weight']
  assert config.method.name == 'flexround' and config.iters == fr.QuantConfig().iters   # budget: QuantConfig's
  assert fr.preset(name.lower().replace('-', '_')).weight == config.weight   # case, '-' and '_' ignored


def test_activation_presets_quantize_inputs_and_the_others_do_not():
  w8a8, w4a8 = fr.preset('W8A8'), fr.preset('W4A8')
  assert isinstance(w8a8.activation, act_lib.ActQuantizer) and w8a8.activation.describe()['name'] == 'lsq'
  assert w8a8.activation.bits == 8 and w8a8.activation.static and w8a8.weight.bits == 8
  assert w4a8.activation.describe() == {'name': 'per_token', 'bits': 8} and w4a8.weight.bits == 4
  for name in ('W4', 'W4G128', 'W3G128', 'GGUF-Q4_0'):
    assert fr.preset(name).activation is None


def test_preset_overrides_and_errors():
  config = fr.preset('w4g128', iters=500, blocks=r'layers_\d+', weight={'bits': 3}, method={'name': 'gptq'})
  assert config.iters == 500 and config.blocks == r'layers_\d+' and config.method.name == 'gptq'
  assert config.weight == fr.QuantSpec(bits=3, granularity='per_group', group_size=128, grid_init='mse')
  with pytest.raises(ValueError, match=r"unknown preset 'W5'; presets: W4, W4G128, W3G128, W8A8, W4A8, GGUF-Q4_0"):
    fr.preset('W5')
  with pytest.raises(ValueError, match=r'unknown QuantConfig fields \[.itres.\]'):
    fr.preset('W4', itres=3)
  with pytest.raises(ValueError, match='QuantSpec.bits'):
    fr.preset('W4', weight={'bits': 1})


@pytest.mark.parametrize('name', list(fr.presets.PRESETS))
def test_scheme_on_a_config_file_gives_the_presets_fields(name):
  """--scheme replaces weight (every field), activation and method, and keeps the file's budget and blocks."""
  config = run.load_config_file(TOY_CONFIG)
  config.quant.weight.group_size = None
  config.quant.activation = {'name': 'lsq', 'bits': 4}
  config_base.apply_preset(config, name)
  got, want = config_base.check(config), fr.preset(name)
  assert got.weight == want.weight and got.method.describe() == want.method.describe()
  assert (got.activation is None) == (want.activation is None)
  if want.activation is not None:
    assert got.activation.describe() == want.activation.describe()
  assert got.iters == 500 and got.batch_size == 32   # configs/toy_mlp.py's budget


def test_importing_presets_does_not_start_jax():
  code = 'import sys, flexround_jax as fr; fr.presets.PRESETS; fr.presets.get("w4"); assert "jax" not in sys.modules'
  subprocess.run([sys.executable, '-c', code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_gguf_q4_0_preset_quantizes_to_what_the_q4_0_export_stores(tmp_path):
  """A 2-layer Llama quantized with the preset (a few FlexRound steps) is written by save_gguf as Q4_0 (which runs
  export.gguf.check_grid on every kernel) and reads back to exactly the quantized kernels."""
  import gguf
  from gguf.quants import dequantize
  from flexround_jax import treepath
  from flexround_jax.models import llama
  config, params = tiny_gguf.tiny_llama(dim=64, ffn_dim=96, head_dim=16)
  params = jax.tree.map(lambda a: a * 0.05, params)
  template = str(tmp_path / 'source.gguf')
  tiny_gguf.write_gguf(template, params, config)
  module = llama.Llama(config)
  calib = np.random.default_rng(0).integers(0, config.vocab_size, (8, 16)).astype(np.int32)
  result = fr.quantize(params, lambda p, t: module.apply({'params': p}, t), calib,
                       fr.preset('GGUF-Q4_0', iters=3, batch_size=4, blocks=r'layers_\d+', progress=False))
  assert len(result.qtensors) == 14
  for name, qt in result.qtensors.items():
    export.gguf.check_grid(name, qt, qt.codes.shape[-2])
    assert np.asarray(qt.codes).min() >= -8 and np.asarray(qt.codes).max() <= 7
    np.testing.assert_array_equal(np.asarray(qt.scale, np.float32).astype(np.float16).astype(np.float32), qt.scale)
  path = str(tmp_path / 'q.gguf')
  info = export.save_gguf(path, result.params, result.qtensors, template_gguf=template)
  assert {v for k, v in info['tensors'].items() if k.endswith('.weight') and 'norm' not in k and 'token' not in k
          and 'output' not in k} == {'Q4_0'}
  names = llama.gguf_tensor_names(config)
  for t in gguf.GGUFReader(path, 'r').tensors:
    key = treepath.path_str(names[t.name])
    if key in result.qtensors:
      got = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape([int(s) for s in t.shape[::-1]])
      proj = names[t.name][-2]
      if proj in ('q_proj', 'k_proj'):
        got = llama.unpermute_qk(got, {'q_proj': config.n_heads, 'k_proj': config.n_kv_heads}[proj])
      np.testing.assert_array_equal(got.T, np.asarray(result.qtensors[key].dequantize()))
