"""Export: packed safetensors and Orbax round trips are exact; damaged files fail loudly, naming the file."""

import os

import numpy as np
import pytest

import flexround_jax as fr
from flexround_jax import export

import tiny_models


@pytest.fixture(scope='module', params=[3, 4])
def quantized(request):
  params, apply_fn, calib = tiny_models.transformer()
  cfg = fr.QuantConfig(method='flexround', weight=fr.QuantSpec(bits=request.param, granularity='per_group',
                                                                group_size=8), blocks=r'layer_\d+', iters=20,
                       batch_size=16, progress=False)
  return params, apply_fn, calib, fr.quantize(params, apply_fn, calib, cfg)


def test_safetensors_round_trip_is_exact(quantized, tmp_path):
  params, apply_fn, calib, result = quantized
  path = str(tmp_path / 'model.safetensors')
  sizes = export.save_safetensors(path, result.params, result.qtensors)
  loaded, qtensors = export.load_safetensors(path)
  np.testing.assert_array_equal(apply_fn(loaded, calib), apply_fn(result.params, calib))
  for name, qt in result.qtensors.items():
    np.testing.assert_array_equal(qtensors[name].codes, qt.codes)
  bits = next(iter(result.qtensors.values())).spec.bits
  n_codes = sum(qt.codes.size for qt in result.qtensors.values())
  assert sizes['file_bytes'] < sizes['float32_bytes']
  with open(path, 'rb') as f:
    assert len(f.read()) == sizes['file_bytes']
  # packed codes take bits/8 bytes per weight
  with __import__('safetensors').safe_open(path, framework='numpy') as f:
    packed = sum(f.get_tensor(k).nbytes for k in f.keys() if k.endswith('.qweight'))
  assert packed == sum((qt.codes.size * bits + 7) // 8 for qt in result.qtensors.values())
  assert packed < n_codes


def test_orbax_round_trip_is_exact(quantized, tmp_path):
  params, apply_fn, calib, result = quantized
  export.save_orbax(str(tmp_path / 'q'), result)
  loaded, qtensors = export.load_orbax(str(tmp_path / 'q'))
  np.testing.assert_array_equal(apply_fn(loaded, calib), apply_fn(result.params, calib))
  rebuilt = fr.dequantize_params(params, qtensors)
  np.testing.assert_array_equal(apply_fn(rebuilt, calib), apply_fn(result.params, calib))


def _damage(src, dst, how):
  data = bytearray(open(src, 'rb').read())
  if how == 'truncate':
    data = data[:len(data) // 2]
  elif how == 'flip_data':
    data[-5] ^= 0xFF
  elif how == 'flip_header':
    data[10] ^= 0xFF
  elif how == 'garbage':
    data = bytearray(os.urandom(256))
  elif how == 'empty':
    data = bytearray()
  open(dst, 'wb').write(bytes(data))


@pytest.mark.parametrize('how', ['truncate', 'flip_data', 'flip_header', 'garbage', 'empty'])
def test_damaged_export_is_a_clear_error(quantized, tmp_path, how):
  _, _, _, result = quantized
  good = str(tmp_path / 'good.safetensors')
  export.save_safetensors(good, result.params, result.qtensors)
  bad = str(tmp_path / f'bad_{how}.safetensors')
  _damage(good, bad, how)
  with pytest.raises(ValueError, match=f'bad_{how}.safetensors'):
    export.load_safetensors(bad)


def test_plain_safetensors_is_not_taken_for_an_export(tmp_path):
  from safetensors.numpy import save_file
  path = str(tmp_path / 'plain.safetensors')
  save_file({'w': np.ones((2, 2), np.float32)}, path)
  with pytest.raises(ValueError, match='not a flexround_jax export'):
    export.load_safetensors(path)


def test_runner_writes_results_and_a_loadable_model(tmp_path):
  from flexround_jax import run
  config = run.load_config_file(os.path.join(os.path.dirname(__file__), '..', 'configs', 'toy_mlp.py'))
  config.quant.iters = 30
  config.task_args.n_calib = 128
  results = run.run(config, str(tmp_path))
  assert results['quantized']['output_mse'] > 0 and results['fp']['output_mse'] == 0
  assert len(results['report']) == 5
  assert results['host']['cpu_count'] >= 1 and results['host']['devices'] >= 1 and results['host']['cpu']
  for name in ('results.json', 'config.json', 'quantize_log.jsonl', 'block_losses.png', 'loss_curves.png'):
    assert (tmp_path / name).exists()
  params, qtensors = export.load_orbax(str(tmp_path / 'quantized'))
  assert len(qtensors) == 8
