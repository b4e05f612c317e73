"""compressed-tensors export: a 2-layer Llama written as 'pack-quantized', read back by compressed-tensors' own
decompressor and transformers, and compared with what compressed-tensors itself writes for the same grids."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

import flexround_jax as fr
from flexround_jax import treepath
from flexround_jax.export.compressed_tensors import hf_names, pack_int32, save_compressed_tensors
from flexround_jax.models import llama
from flexround_jax.quantizers import flexround, rtn

import tiny_gguf

NEEDS = 'compressed-tensors (optional extra [deploy], needs torch) is not installed'
G4 = fr.QuantSpec(bits=4, granularity='per_group', group_size=32, symmetric=True, scale_dtype='float16')
A4 = fr.QuantSpec(bits=4, granularity='per_channel', symmetric=False)
C8 = fr.QuantSpec(bits=8, granularity='per_channel', symmetric=True)
T3 = fr.QuantSpec(bits=3, granularity='per_tensor', symmetric=False)
G5A = fr.QuantSpec(bits=5, granularity='per_group', group_size=16, symmetric=False, scale_dtype='bfloat16')
MIXED = 'mixed'   # attention G4, MLP C8, layers_1 down_proj left dense
SPECS = {'g4': G4, 'a4': A4, 'c8': C8, 't3': T3, 'g5a': G5A, MIXED: None}


@pytest.fixture(scope='module')
def model():
  config, params = tiny_gguf.tiny_llama(dim=64, ffn_dim=96, head_dim=16)
  config = dataclasses.replace(config, rope_base=50000.0, norm_eps=1e-6)   # non-defaults must reach config.json
  return config, jax.tree.map(lambda a: a * 0.05, params)


def _spec_of(variant, name):
  if isinstance(variant, fr.QuantSpec):
    return variant
  if variant != MIXED:
    return SPECS[variant]
  if name == 'layers_1/mlp/down_proj/kernel':
    return None
  return G4 if '/attn/' in name else C8


def _qtensors(params, variant, learned=True):
  """Projection kernels on the grid of ``variant`` (a QuantSpec or a SPECS key): FlexRound with perturbed divisors
  (codes RTN would not give) when learned."""
  out = {}
  for i, (name, kernel) in enumerate(sorted(treepath.flatten(params).items())):
    s = _spec_of(variant, name) if name.endswith('/kernel') else None
    if s is None:
      continue
    if learned:
      state = flexround.init(kernel, s)
      state['log_s2'] = state['log_s2'] + 0.3 * jax.random.normal(jax.random.key(i), kernel.shape)
      out[name] = flexround.finalize(kernel, state, s)
    else:
      out[name] = rtn.finalize(kernel, rtn.init(kernel, s), s)
  return out


@pytest.fixture(scope='module')
def written(model, tmp_path_factory):
  """{variant: (folder, qtensors)}, each written once (only for the tests that read them with compressed-tensors)."""
  pytest.importorskip('compressed_tensors', reason=NEEDS)
  config, params = model
  root = tmp_path_factory.mktemp('ct')
  out = {}
  for variant in SPECS:
    qts = _qtensors(params, variant)
    save_compressed_tensors(str(root / variant), params, qts, config)
    out[variant] = str(root / variant), qts
  return out


def _hf_weight(path, value):
  """HF layout of a Flax param: kernels (in, out) transposed to (out, in), the rest as they are."""
  return np.asarray(value).T if path.endswith('/kernel') else np.asarray(value)


def _ct_grid(grid, qt):
  """Our scale / zero point grid in compressed-tensors' layout: (out, groups), or (1,) per tensor."""
  grid = np.asarray(grid)
  return (grid.reshape(1) if qt.spec.granularity == 'per_tensor' else grid.reshape(-1, qt.shape[1]).T).copy()


@pytest.mark.parametrize('bits, rows, cols', [(4, 3, 64), (4, 2, 70), (8, 5, 33), (3, 4, 45), (5, 2, 7), (2, 1, 96)])
def test_packing_is_compressed_tensors_pack_to_int32(bits, rows, cols):
  pytest.importorskip('compressed_tensors', reason=NEEDS)
  import torch
  from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
  values = np.random.default_rng(bits * cols).integers(0, 2 ** bits, size=(rows, cols))
  theirs = pack_to_int32(torch.tensor(values - 2 ** (bits - 1), dtype=torch.int8), bits).numpy()
  np.testing.assert_array_equal(pack_int32(values, bits), theirs)
  assert pack_int32(values, bits).dtype == np.int32


@pytest.mark.parametrize('variant', list(SPECS))
def test_compressed_tensors_decompresses_exactly_our_kernels(model, written, variant):
  import torch
  from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
  from safetensors.torch import load_file
  config, params = model
  folder, qts = written[variant]
  # The package's own file-level decompressor: validates config.json with its pydantic schema, matches tensors to
  # config groups, unpacks and dequantizes, and fails on any quantization param left over.
  dense = CompressedTensorsDequantizer(folder, dtype=torch.float32).validate(load_file(f'{folder}/model.safetensors'))
  flat = treepath.flatten(params)
  names = hf_names(config)
  expected = {(hf + '.weight' if path.endswith('/kernel') else hf): path for path, hf in names.items()}
  assert set(dense) == set(expected)
  for hf, path in expected.items():
    want = _hf_weight(path, qts[path].dequantize() if path in qts else flat[path])
    got = dense[hf].numpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want, err_msg=hf)


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_half_precision_checkpoints_round_once_to_the_dtype(model, tmp_path, dtype):
  pytest.importorskip('compressed_tensors', reason=NEEDS)
  import torch
  from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
  from safetensors.torch import load_file
  config, params = model
  qts = _qtensors(params, G4.replace(scale_dtype=dtype))
  info = save_compressed_tensors(str(tmp_path / 'h'), params, qts, config, dtype=dtype)
  assert info['tensors']['model.layers.0.self_attn.q_proj.weight_scale'] == dtype
  assert info['tensors']['model.embed_tokens.weight'] == dtype
  tensors = load_file(str(tmp_path / 'h' / 'model.safetensors'))
  torch_dtype = getattr(torch, dtype)
  dense = CompressedTensorsDequantizer(str(tmp_path / 'h'), dtype=torch_dtype).validate(tensors)
  for path, hf in hf_names(config).items():
    if path in qts:   # compressed-tensors computes in the scale's dtype: our exact float32 value, rounded once
      want = torch.from_numpy(_hf_weight(path, qts[path].dequantize()).copy()).to(torch_dtype)
      assert torch.equal(dense[hf + '.weight'], want), hf
  assert json.load(open(tmp_path / 'h' / 'config.json'))['torch_dtype'] == dtype


@pytest.mark.parametrize('variant', ['g4', 'a4', 'c8', 't3', MIXED])
def test_compressed_tensors_writes_the_same_folder(model, written, tmp_path, variant):
  """compressed-tensors' own writer (apply_quantization_config, ModelCompressor.compress_model, save_pretrained,
  update_config) on a transformers Llama holding our dequantized weights and our grids writes the same tensors
  (names, dtypes, shapes, bytes) and the same quantization_config."""
  import torch
  import transformers
  from compressed_tensors.compressors import ModelCompressor
  from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
  from safetensors.torch import load_file
  config, params = model
  folder, qts = written[variant]
  ours = load_file(f'{folder}/model.safetensors')
  ours_config = json.load(open(f'{folder}/config.json'))
  hf_config = transformers.LlamaConfig(**{k: v for k, v in ours_config.items() if k != 'quantization_config'})
  hf = transformers.LlamaForCausalLM(hf_config).eval()
  fake_quant = treepath.flatten(fr.dequantize_params(params, qts))
  names = hf_names(config)
  dense = {(n + '.weight' if p.endswith('/kernel') else n): _hf_weight(p, fake_quant[p]) for p, n in names.items()}
  hf.load_state_dict({n: torch.from_numpy(w.copy()) for n, w in dense.items()}, strict=False)
  apply_quantization_config(hf, QuantizationConfig.model_validate(ours_config['quantization_config']))
  by_module = {names[p]: qt for p, qt in qts.items()}
  for name, module in hf.named_modules():
    if name not in by_module:
      assert not hasattr(module, 'weight_scale'), name
      continue
    qt = by_module[name]
    module.weight_scale.data = torch.from_numpy(_ct_grid(qt.scale, qt)).reshape(module.weight_scale.shape)
    if not qt.spec.symmetric:   # compressed-tensors' zero points are signed: ours - 2**(b-1)
      zp = torch.from_numpy(_ct_grid(qt.zero_point, qt) - 2 ** (qt.spec.bits - 1)).to(torch.int8)
      module.weight_zero_point.data = zp.reshape(module.weight_zero_point.shape)
  compressor = ModelCompressor.from_pretrained_model(hf, 'pack-quantized')
  compressor.compress_model(hf)
  hf.save_pretrained(str(tmp_path))
  compressor.update_config(str(tmp_path))
  theirs = load_file(str(tmp_path / 'model.safetensors'))
  assert set(theirs) == set(ours)
  for key, value in ours.items():
    assert (value.dtype, value.shape) == (theirs[key].dtype, theirs[key].shape), key
    assert torch.equal(value, theirs[key]), key
  assert json.load(open(tmp_path / 'config.json'))['quantization_config'] == ours_config['quantization_config']


@pytest.mark.filterwarnings('ignore:You passed `quantization_config`:UserWarning')   # dequantize=True, on purpose
@pytest.mark.parametrize('variant', ['g4', 'a4', MIXED])
def test_transformers_loads_the_fake_quant_model(model, written, variant):
  import torch
  import transformers
  config, params = model
  folder, qts = written[variant]
  kwargs = {}
  if variant == 'a4':   # transformers 5 + compressed-tensors 0.20 load asymmetric channel/group grids only this way
    kwargs['quantization_config'] = transformers.CompressedTensorsConfig(dequantize=True)
  hf = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
  rope = getattr(hf.config, 'rope_parameters', None) or {'rope_theta': hf.config.rope_theta}   # transformers 5 / 4
  assert rope['rope_theta'] == config.rope_base and hf.config.rms_norm_eps == config.norm_eps
  tokens = np.array([[1, 5, 9, 33, 2, 60, 17, 4, 40, 11]])
  with torch.no_grad():
    got = hf(torch.tensor(tokens)).logits.numpy()
  state = hf.state_dict()   # decompressed by the first forward
  for path, name in hf_names(config).items():
    if path in qts:
      want = _hf_weight(path, qts[path].dequantize())
      np.testing.assert_array_equal(state[name + '.weight'].numpy(), want, err_msg=name)
  want = np.asarray(llama.Llama(config).apply({'params': fr.dequantize_params(params, qts)}, tokens))
  # Same weights; the two float32 forwards differ only in op order (RoPE angles, softmax, matmul accumulation).
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_config_json(model, tmp_path):
  config, params = model
  qts = _qtensors(params, MIXED, learned=False)
  save_compressed_tensors(str(tmp_path / 'm'), params, qts, config)
  cfg = json.load(open(tmp_path / 'm' / 'config.json'))
  assert {k: cfg[k] for k in ('architectures', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                              'num_attention_heads', 'num_key_value_heads', 'head_dim', 'rms_norm_eps', 'rope_theta',
                              'max_position_embeddings', 'vocab_size', 'tie_word_embeddings', 'bos_token_id',
                              'eos_token_id', 'torch_dtype')} == {
      'architectures': ['LlamaForCausalLM'], 'hidden_size': 64, 'intermediate_size': 96, 'num_hidden_layers': 2,
      'num_attention_heads': 4, 'num_key_value_heads': 2, 'head_dim': 16, 'rms_norm_eps': 1e-6, 'rope_theta': 50000.0,
      'max_position_embeddings': config.max_seq_len, 'vocab_size': 64, 'tie_word_embeddings': True,
      'bos_token_id': config.bos_token_id, 'eos_token_id': config.eos_token_id, 'torch_dtype': 'float32'}
  q = cfg['quantization_config']
  assert (q['quant_method'], q['format'], q['quantization_status'], q['ignore']) == (
      'compressed-tensors', 'pack-quantized', 'compressed', ['model.layers.1.mlp.down_proj', 'lm_head'])
  groups = list(q['config_groups'].values())
  assert [g['weights'] for g in groups] == [
      {'num_bits': 4, 'type': 'int', 'symmetric': True, 'strategy': 'group', 'group_size': 32, 'dynamic': False},
      {'num_bits': 8, 'type': 'int', 'symmetric': True, 'strategy': 'channel', 'group_size': None, 'dynamic': False}]
  assert groups[0]['targets'] == [f'model.layers.{i}.self_attn.{p}_proj' for i in range(2) for p in 'qkvo']
  assert 'model.layers.1.mlp.down_proj' not in groups[1]['targets'] and len(groups[1]['targets']) == 5
  # One grid: targets ['Linear'], the projections left dense ignored; no QTensors: a plain HF checkpoint.
  qts = _qtensors(params, 'c8', learned=False)
  del qts['layers_0/attn/k_proj/kernel']
  save_compressed_tensors(str(tmp_path / 'one'), params, qts, config)
  q = json.load(open(tmp_path / 'one' / 'config.json'))['quantization_config']
  assert [g['targets'] for g in q['config_groups'].values()] == [['Linear']]
  assert q['ignore'] == ['model.layers.0.self_attn.k_proj', 'lm_head']
  info = save_compressed_tensors(str(tmp_path / 'fp'), params, {}, config)
  assert 'quantization_config' not in json.load(open(tmp_path / 'fp' / 'config.json'))
  assert set(info['tensors'].values()) == {'float32'} and len(info['tensors']) == 20


def _one(params, name, spec):
  kernel = treepath.flatten(params)[name]
  return {name: rtn.finalize(kernel, rtn.init(kernel, spec), spec)}


def test_grids_the_format_cannot_hold_are_refused_naming_the_kernel(model, tmp_path):
  config, params = model
  out = str(tmp_path / 'x')
  down = 'layers_1/mlp/down_proj/kernel'   # 96 inputs
  with pytest.raises(ValueError, match=f'kernel {down}: group_size=64 does not divide its 96 inputs'):
    save_compressed_tensors(out, params, _one(params, down, G4.replace(group_size=64)), config)
  with pytest.raises(ValueError, match=f"kernel {down}: scales of QuantSpec.scale_dtype='float32' would be rounded "
                                       'when stored as float16'):
    save_compressed_tensors(out, params, _one(params, down, G4.replace(scale_dtype='float32')), config, dtype='float16')
  with pytest.raises(ValueError, match="scale_dtype='float16' would be rounded when stored as bfloat16"):
    save_compressed_tensors(out, params, _one(params, down, G4), config, dtype='bfloat16')
  qts = _one(params, down, G4)
  qt = qts[down]
  tampered = {down: qt.__class__(qt.codes, np.asarray(qt.scale) * np.float32(1 + 2 ** -20), qt.zero_point, qt.spec)}
  with pytest.raises(ValueError, match=f'kernel {down}: scale values are not exactly representable in float16'):
    save_compressed_tensors(out, params, tampered, config, dtype='float16')
  assert os.listdir(tmp_path) == []   # nothing written, no temporary folder left


def test_bad_arguments_are_clear_errors_before_writing(model, tmp_path):
  config, params = model
  out = str(tmp_path / 'x')
  q = 'layers_0/attn/q_proj/kernel'
  good = _one(params, q, C8)
  with pytest.raises(ValueError, match="qtensors name 'layers_9/attn/q_proj/kernel', which is not a projection"):
    save_compressed_tensors(out, params, {'layers_9/attn/q_proj/kernel': good[q]}, config)
  with pytest.raises(ValueError, match="qtensors name 'embed_tokens/embedding'"):
    save_compressed_tensors(out, params, {'embed_tokens/embedding': good[q]}, config)
  with pytest.raises(ValueError, match='kernel layers_0/mlp/gate_proj/kernel: QTensor shape \\(64, 64\\), the param'):
    save_compressed_tensors(out, params, {'layers_0/mlp/gate_proj/kernel': good[q]}, config)
  bad = {q: good[q].__class__(np.asarray(good[q].codes).astype(np.uint8), good[q].scale, good[q].zero_point, C8)}
  with pytest.raises(ValueError, match=f'kernel {q}: codes must be int8'):
    save_compressed_tensors(out, params, bad, config)
  missing = jax.tree.map(lambda a: a, params)
  del missing['layers_1']['post_attention_layernorm']
  with pytest.raises(ValueError, match='params lack layers_1/post_attention_layernorm/scale'):
    save_compressed_tensors(out, missing, good, config)
  wrong = jax.tree.map(lambda a: a, params)
  wrong['norm']['scale'] = np.ones(63, np.float32)
  with pytest.raises(ValueError, match='param norm/scale has shape \\(63,\\)'):
    save_compressed_tensors(out, wrong, good, config)
  with pytest.raises(ValueError, match='dtype must be one of'):
    save_compressed_tensors(out, params, good, config, dtype='float64')
  assert os.listdir(tmp_path) == []   # nothing written, no temporary folder left

  save_compressed_tensors(out, params, good, config)
  with pytest.raises(FileExistsError, match='overwrite=True'):
    save_compressed_tensors(out, params, good, config)
  open(os.path.join(out, 'stale.txt'), 'w').close()
  save_compressed_tensors(out, params, good, config, overwrite=True)
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors'] and os.listdir(tmp_path) == ['x']


def test_a_failed_write_leaves_no_folder_and_keeps_the_old_one(model, tmp_path, monkeypatch):
  import safetensors.numpy
  config, params = model
  good = _one(params, 'layers_0/mlp/up_proj/kernel', A4)
  out = str(tmp_path / 'x')
  real_save = safetensors.numpy.save_file

  def crash(*args, **kwargs):
    raise OSError('disk full')

  monkeypatch.setattr(safetensors.numpy, 'save_file', crash)
  with pytest.raises(OSError, match='disk full'):
    save_compressed_tensors(out, params, good, config)
  assert os.listdir(tmp_path) == []   # nothing written, no temporary folder left
  monkeypatch.setattr(safetensors.numpy, 'save_file', real_save)
  save_compressed_tensors(out, params, good, config)
  before = open(os.path.join(out, 'model.safetensors'), 'rb').read()
  monkeypatch.setattr(safetensors.numpy, 'save_file', crash)
  with pytest.raises(OSError, match='disk full'):
    save_compressed_tensors(out, params, _one(params, 'layers_0/mlp/up_proj/kernel', C8), config, overwrite=True)
  assert os.listdir(tmp_path) == ['x'] and open(os.path.join(out, 'model.safetensors'), 'rb').read() == before
