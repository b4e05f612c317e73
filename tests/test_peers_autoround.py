"""experiments/peers/: AutoRound's packed integer layers read back into our QTensors (autoround_format.py), and the
per-window NLL that every peer row stores (window_nll.py).

The packers below are numpy ports of auto-round 0.16.1's ``auto_round_extension.torch.qlinear_torch.QuantLinear``
(``pack_248_bits``: codes shifted by b * j and summed per 32-bit word; ``pack_3bits``: ten 3-bit codes per word with
the 11th and 22nd codes split across word boundaries), so the reader is checked against the layout AutoRound writes,
not against its own inverse. With auto-round installed (``make peers``; not in .venv) the last test also packs
with auto-round's own class. The AutoRound run itself (torch, auto-round, minutes of CPU) is
experiments/peers/autoround_smollm2.py, not a test.
"""

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from flexround_jax.evals import perplexity
from flexround_jax.models import decoder
from flexround_jax.spec import QuantSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_peer_module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'experiments', 'peers', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


fmt = _load_peer_module('autoround_format')
window_nll = _load_peer_module('window_nll')
layer_seconds = _load_peer_module('layer_seconds')


def _pack_248(intweight, bits):
  """auto-round's pack_248_bits on (rows, cols) codes packed along cols -> (rows, cols * bits / 32) int32."""
  w = intweight.astype(np.int64).reshape(intweight.shape[0], -1, 32 // bits)
  words = (w << (np.arange(32 // bits) * bits)).sum(-1)
  return (words & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


def _pack_3(intweight):
  """auto-round's pack_3bits loop on (rows, cols) codes packed along cols -> (rows, cols * 3 / 32) int32."""
  z = intweight.astype(np.int64)
  out = np.zeros((z.shape[0], z.shape[1] // 32 * 3), np.int64)
  i = col = 0
  while col < out.shape[1]:
    out[:, col] = (z[:, i:i + 10] << (np.arange(10) * 3)).sum(-1)
    i += 10
    out[:, col] |= z[:, i] << 30
    col += 1
    out[:, col] |= (z[:, i] >> 2) & 1
    i += 1
    out[:, col] |= (z[:, i:i + 10] << (np.arange(10) * 3 + 1)).sum(-1)
    i += 10
    out[:, col] |= z[:, i] << 31
    col += 1
    out[:, col] |= (z[:, i] >> 1) & 0x3
    i += 1
    out[:, col] |= (z[:, i:i + 10] << (np.arange(10) * 3 + 2)).sum(-1)
    i += 10
    col += 1
  return (out & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


def _pack(codes, bits):
  return _pack_3(codes) if bits == 3 else _pack_248(codes, bits)


def _synthetic_layer(bits, n_in, n_out, group_size, seed=0):
  """Codes (out, in), zero points and fp16 scales (groups, out) as AutoRound holds them, and its packed tensors."""
  rng = np.random.default_rng(seed)
  groups = 1 if group_size == -1 else -(-n_in // group_size)
  codes = rng.integers(0, 2 ** bits, (n_out, n_in))
  zeros = rng.integers(0, 2 ** bits, (n_out, groups))
  scales = rng.uniform(1e-3, 1e-1, (n_out, groups)).astype(np.float16)
  packed = {'qweight': _pack(codes, bits).T, 'qzeros': _pack(zeros.T, bits), 'scales': scales.T}
  return codes, zeros, scales, packed


@pytest.mark.parametrize('bits,group_size', [(4, -1), (4, 128), (3, 128), (3, -1), (2, 64), (8, 32)])
def test_packed_layer_reads_back_codes_zeros_and_scales(bits, group_size):
  n_in, n_out = 320, 96   # 320 = 2 x 128 + 64: a shorter last group, as SmolLM2's 576-wide inputs at g128
  codes, zeros, scales, packed = _synthetic_layer(bits, n_in, n_out, group_size)
  qt = fmt.qtensor_from_packed(packed['qweight'], packed['qzeros'], packed['scales'], bits, group_size)
  assert qt.codes.shape == (n_in, n_out) and qt.codes.dtype == np.uint8
  np.testing.assert_array_equal(qt.codes, codes.T)
  np.testing.assert_array_equal(qt.zero_point, zeros.T)
  np.testing.assert_array_equal(qt.scale, scales.T.astype(np.float32))
  expected_spec = (QuantSpec(bits, 'per_channel', None, False, scale_dtype='float16') if group_size == -1 else
                   QuantSpec(bits, 'per_group', group_size, False, scale_dtype='float16'))
  assert qt.spec == expected_spec
  # W_hat[o, i] = scale[o, i // g] * (code[o, i] - zero[o, i // g]), AutoRound's qdq, in our (in, out) layout.
  g = n_in if group_size == -1 else group_size
  group = np.arange(n_in) // g
  w_hat = scales.astype(np.float32)[:, group] * (codes - zeros[:, group])
  np.testing.assert_array_equal(np.asarray(qt.dequantize()), w_hat.T.astype(np.float32))


def test_gptq_packing_stores_zero_point_minus_one():
  codes, zeros, scales, packed = _synthetic_layer(4, 64, 32, 32)
  zeros = np.maximum(zeros, 1)
  qzeros = _pack((zeros - 1).T, 4)
  qt = fmt.qtensor_from_packed(packed['qweight'], qzeros, packed['scales'], 4, 32, 'auto_round:auto_gptq')
  np.testing.assert_array_equal(qt.zero_point, zeros.T)


def test_bad_packed_layers_are_refused_by_name():
  _, _, _, packed = _synthetic_layer(4, 64, 32, 32)
  with pytest.raises(ValueError, match='layer7: packing_format'):
    fmt.qtensor_from_packed(packed['qweight'], packed['qzeros'], packed['scales'], 4, 32, 'awq', where='layer7')
  with pytest.raises(ValueError, match='needs scales'):
    fmt.qtensor_from_packed(packed['qweight'], packed['qzeros'], packed['scales'], 4, 16)
  with pytest.raises(ValueError, match='scale'):
    fmt.qtensor_from_packed(packed['qweight'], packed['qzeros'], -packed['scales'], 4, 32)
  with pytest.raises(ValueError, match='int32 words'):
    fmt.unpack_bitstream(np.zeros((2, 4), np.int64), 4)


def test_checkpoint_folder_into_decoder_params(tmp_path):
  """A tiny Llama decoder's projections packed as an AutoRound folder -> QTensors on its kernel paths ->
  dequantize_params: every kernel is AutoRound's W_hat, everything else is unchanged."""
  from safetensors.numpy import save_file
  from flexround_jax import dequantize_params

  config = decoder.DecoderConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=2,
                                 num_kv_heads=1, head_dim=32, tie_embeddings=True)
  _, params = decoder.make_decoder(config)
  names = {hf_name[:-len('.weight')]: '/'.join(path) for hf_name, path in fmt.hf.hf_param_names(config).items()
           if path[-1] == 'kernel'}
  tensors, expected = {}, {}
  for i, (module, path) in enumerate(sorted(names.items())):
    kernel = np.asarray(_leaf(params, path))
    codes, zeros, scales, packed = _synthetic_layer(4, kernel.shape[0], kernel.shape[1], 32, seed=i)
    tensors.update({f'{module}.{k}': np.ascontiguousarray(v) for k, v in packed.items()})
    group = np.arange(kernel.shape[0]) // 32
    expected[path] = (scales.astype(np.float32)[:, group] * (codes - zeros[:, group])).T
  tensors['model.norm.weight'] = np.ones(64, np.float16)
  save_file(tensors, str(tmp_path / 'model.safetensors'))
  qc = {'quant_method': 'auto-round', 'bits': 4, 'group_size': 32, 'sym': False, 'data_type': 'int',
        'packing_format': 'auto_round'}
  (tmp_path / 'config.json').write_text(json.dumps({'quantization_config': qc}))

  read_qc, by_module = fmt.read_checkpoint(str(tmp_path))
  assert read_qc['bits'] == 4 and sorted(by_module) == sorted(names)
  qtensors = fmt.decoder_qtensors(by_module, config)
  assert sorted(qtensors) == sorted(expected) and len(qtensors) == 14
  params_q = dequantize_params(params, qtensors)
  for path, w_hat in expected.items():
    np.testing.assert_array_equal(np.asarray(_leaf(params_q, path)), w_hat.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(params_q['embed_tokens']['embedding']),
                                np.asarray(params['embed_tokens']['embedding']))

  (tmp_path / 'config.json').write_text(json.dumps({'quantization_config': {**qc, 'sym': True}}))
  with pytest.raises(ValueError, match='not an asymmetric integer AutoRound checkpoint'):
    fmt.read_checkpoint(str(tmp_path))
  with pytest.raises(ValueError, match='not a projection kernel'):
    fmt.decoder_qtensors({'model.embed_tokens': next(iter(by_module.values()))}, config)


def test_layer_seconds_are_the_progress_bar_differences():
  """Per-layer seconds from AutoRound's progress bar: carriage-return updates, several prints per layer, other bars
  (its caching, our loading) ignored, and an hour rolled into h:mm:ss."""
  log = ('Loading weights: 100%|##| 272/272 [00:00<00:00]\n'
         'Quantizing model.layers.0:   0%|          | 0/3 [00:00<?, ?it/s]\r'
         'Quantizing model.layers.0:   0%|          | 0/3 [00:01<?, ?it/s]\r'
         'Quantizing model.layers.1:  33%|###3      | 1/3 [00:58<01:56, 58.0s/it]\r'
         'Quantizing model.layers.1:  33%|###3      | 1/3 [00:58<01:56, 58.0s/it]\n'
         'caching: 100%|##| 128/128 [00:07<00:00]\r'
         'Quantizing model.layers.2:  67%|######6   | 2/3 [59:59<00:32, 32.0s/it]\r'
         'Quantizing model.layers.2: 100%|##########| 3/3 [1:00:31<00:00, 32.0s/it]\n')
  assert layer_seconds.layer_seconds(log) == [58, 3541, 32]
  with pytest.raises(SystemExit, match='missing'):
    layer_seconds.layer_seconds(log.replace('2/3 [59:59', '9/9 [59:59'))


def test_window_nll_is_the_protocol_perplexity_window_by_window():
  """experiments/peers/window_nll.py: mean NLL per window; exp(mean over windows) is ``perplexity``'s number (every
  window scores the same number of tokens), with a last batch shorter than the others."""
  module, params = decoder.make_decoder()
  apply_fn = lambda p, t: module.apply({'params': p}, t)
  windows = np.random.default_rng(0).integers(0, 256, (5, 16)).astype(np.int32)
  nll = window_nll.window_nll(apply_fn, params, windows, batch_size=2)
  ref = perplexity.perplexity(apply_fn, params, windows, batch_size=2, progress=False)
  assert nll.shape == (5,)
  assert np.exp(np.mean(nll)) == pytest.approx(ref['ppl'], rel=1e-6)
  one = window_nll.window_nll(apply_fn, params, windows[3:4], batch_size=2)
  assert one[0] == pytest.approx(nll[3], rel=1e-6)
  assert window_nll.nll_path('a/b.json') == 'a/b.window_nll.txt'


def _leaf(tree, path):
  for key in path.split('/'):
    tree = tree[key]
  return tree


@pytest.mark.skipif(importlib.util.find_spec('auto_round') is None,
                    reason='auto-round is not installed (it lives in `make peers`\'s .venv-peers, never in .venv)')
@pytest.mark.parametrize('bits', [3, 4])
def test_reader_matches_auto_round_own_packer(bits):
  import torch
  from auto_round_extension.torch.qlinear_torch import QuantLinear

  n_in, n_out, g = 256, 64, 128
  codes, zeros, scales, _ = _synthetic_layer(bits, n_in, n_out, g, seed=bits)
  group = np.arange(n_in) // g
  w_hat = scales.astype(np.float32)[:, group] * (codes - zeros[:, group])
  linear = torch.nn.Linear(n_in, n_out, bias=False)
  linear.weight.data = torch.from_numpy(w_hat)
  layer = QuantLinear(bits, g, n_in, n_out, bias=False)
  layer.device = torch.device('cpu')   # as auto-round's export.pack_layer sets it before packing
  layer.pack(linear, torch.from_numpy(scales.astype(np.float32)), torch.from_numpy(zeros).to(torch.int32), None)
  qt = fmt.qtensor_from_packed(layer.qweight.numpy(), layer.qzeros.numpy(), layer.scales.numpy(), bits, g)
  np.testing.assert_array_equal(qt.codes, codes.T)
  np.testing.assert_array_equal(qt.zero_point, zeros.T)
  np.testing.assert_array_equal(np.asarray(qt.dequantize(jnp.float32)), w_hat.T)


@pytest.mark.skipif(importlib.util.find_spec('auto_round') is None,
                    reason='auto-round is not installed (it lives in `make peers`\'s .venv-peers, never in .venv)')
@pytest.mark.parametrize('bits,group_size', [(4, -1), (3, 32), (3, 48)])   # 48: partial last groups
def test_autoround_run_reads_back_as_it_held_the_grid(tmp_path, bits, group_size):
  """A tiny random Llama through AutoRound's public API (2 steps) and the save format autoround_smollm2.py uses: the
  folder reads back to the scales and zero points AutoRound held and the codes its packer derives (~10 s)."""
  import torch
  import transformers
  from tokenizers import Tokenizer, models
  from auto_round import AutoRound
  runner = _load_peer_module('autoround_smollm2')

  config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                    tie_word_embeddings=True)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer(models.WordLevel({f't{i}': i for i in range(128)}, unk_token='t0')))
  ids = torch.randint(0, 128, (16, 64))
  ar = AutoRound(model, tokenizer, bits=bits, group_size=group_size, sym=False, iters=2, nsamples=16, seqlen=64,
                 batch_size=8, dataset=list(torch.split(ids, 8)), device_map='cpu', seed=42)
  ar.quantize()
  grid = runner.in_memory_grid(model, bits, group_size)
  ar.save_quantized(str(tmp_path), format=runner.EXPORT_FORMAT, inplace=True)
  qc, by_module = fmt.read_checkpoint(str(tmp_path))
  assert qc['packing_format'] == runner.EXPORT_FORMAT and qc['bits'] == bits
  check = runner.readback_check(by_module, grid)
  assert check['layers_read'] == check['layers_compared'] == 14 and check['codes_scales_zeros_equal'], check
