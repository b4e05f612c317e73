"""Exports of Hugging Face family decoders (``models.load_hf`` fixtures: Llama, Mistral, Qwen2, Qwen3, Gemma 3 and a
multimodal Gemma 3): compressed-tensors folders under the family's own names and config.json, read back by
compressed-tensors' decompressor and transformers (only where torch is installed: ``make deploy``), and our own
safetensors format round trip."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexround_jax as fr
from flexround_jax import treepath, weights
from flexround_jax.export import compressed_tensors as ct
from flexround_jax.models import hf, load_hf
from flexround_jax.quantizers import flexround, rtn

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf')
FAMILIES = ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma3', 'gemma3_multimodal')
NEEDS = 'compressed-tensors and transformers (optional extra [deploy], needs torch: make deploy) are not installed'
# Fixture widths: inputs 48 (q/k/v/gate/up), 48 or 72 (o_proj: heads * head_dim), 80 (down_proj): groups of 8.
G8 = fr.QuantSpec(bits=4, granularity='per_group', group_size=8, symmetric=True)
C4 = fr.QuantSpec(bits=4, granularity='per_channel', symmetric=False)
SPECS = {'g8': G8, 'c4': C4}
# max |transformers - ours| / max |ours| over the logits of the reference tokens, both float32 on the same
# dequantized weights; the forwards differ only in op order (RoPE angles, softmax, matmul accumulation).
RTOL = 1e-5


@pytest.fixture(scope='module')
def models():
  return {family: load_hf(os.path.join(FIXTURES, family)) for family in FAMILIES}


_QTENSORS = {}   # the tests share each (fixture, spec, lm_head) quantization: computing one is most of their time


def _qtensors(model, spec, lm_head=False):
  """Every projection kernel (and an untied lm_head with ``lm_head``) on ``spec``'s grid: FlexRound with perturbed
  divisors, codes RTN would not give (a new dict; the QTensors are shared)."""
  key = model.path, spec, lm_head
  if key not in _QTENSORS:
    _QTENSORS[key] = _quantize(model, spec, lm_head)
  return dict(_QTENSORS[key])


def _quantize(model, spec, lm_head):
  out = {}
  for i, (name, kernel) in enumerate(sorted(treepath.flatten(model.params).items())):
    if not name.endswith('/kernel') or (name == 'lm_head/kernel' and not lm_head):
      continue
    kernel = jnp.asarray(kernel)
    state = flexround.init(kernel, spec)
    state['log_s2'] = state['log_s2'] + 0.3 * jax.random.normal(jax.random.key(i), kernel.shape)
    out[name] = flexround.finalize(kernel, state, spec)
  return out


def _tokens(family):
  return np.load(os.path.join(FIXTURES, family, 'reference.npz'))['tokens']


def _fake_quant_logits(model, qts, tokens):
  return np.asarray(model.apply_fn(fr.dequantize_params(model.params, qts), jnp.asarray(tokens)))


def _relative_error(got, want) -> float:
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def _source_tensors(family):
  """{CausalLM tensor name: array} of a fixture's files (a multimodal one: its text tensors, renamed)."""
  path = os.path.join(FIXTURES, family)
  files = sorted(f for f in os.listdir(path) if f.endswith('.safetensors'))
  out = {}
  for f in files:
    for name, array in weights.load_params(os.path.join(path, f)).items():
      name = hf._text_name(name, family == 'gemma3_multimodal')  # pylint: disable=protected-access
      if name is not None:
        out[name] = np.asarray(array)
  return out


# --- without torch ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('family', FAMILIES)
def test_tensors_are_the_family_names_and_values(models, tmp_path, family):
  """Every source tensor is written under its own name: quantized projections as weight_packed / _scale / _shape,
  the rest (biases, q/k norms, Gemma's four norms, untied lm_head) bit for bit."""
  from safetensors.numpy import load_file
  model = models[family]
  qts = _qtensors(model, G8)
  info = ct.save_compressed_tensors(str(tmp_path / 'q'), model.params, qts, model.config, source=model.path)
  written = load_file(str(tmp_path / 'q' / 'model.safetensors'))
  assert set(info['tensors']) == set(written)
  source = _source_tensors(family)
  quantized = {ct.hf_names(model.config)[p] + '.weight' for p in qts}
  expected = {n for n in source if n not in quantized}
  expected |= {f'{m[:-len(".weight")]}.{part}' for m in quantized for part in ('weight_packed', 'weight_scale',
                                                                              'weight_shape')}
  assert set(written) == expected
  for name in source.keys() - quantized:
    np.testing.assert_array_equal(written[name], source[name], err_msg=name)
  names = set(source)
  assert {'qwen2': 'model.layers.1.self_attn.k_proj.bias', 'qwen3': 'model.layers.0.self_attn.q_norm.weight',
          'gemma3': 'model.layers.2.pre_feedforward_layernorm.weight', 'llama': 'lm_head.weight'}.get(
              family, 'model.norm.weight') in names


@pytest.mark.parametrize('family', FAMILIES)
def test_config_json_is_the_source_s_with_quantization_config(models, tmp_path, family):
  model = models[family]
  qts = _qtensors(model, C4)
  info = ct.save_compressed_tensors(str(tmp_path / 'q'), model.params, qts, model.config, source=model.path)
  written = json.load(open(tmp_path / 'q' / 'config.json'))
  source = json.load(open(os.path.join(model.path, 'config.json')))
  if family == 'gemma3_multimodal':   # the text model, as a Gemma3ForCausalLM
    assert written['architectures'] == ['Gemma3ForCausalLM'] and written['model_type'] == 'gemma3_text'
    source = {**source['text_config'], 'architectures': ['Gemma3ForCausalLM'], 'dtype': source['dtype'],
              'transformers_version': source['transformers_version']}
  assert {k: v for k, v in written.items() if k != 'quantization_config'} == source
  assert hf.decoder_config(written) == model.config
  q = written['quantization_config']
  assert q['ignore'] == ['lm_head'] and [g['targets'] for g in q['config_groups'].values()] == [['Linear']]
  assert info['copied'] == ['generation_config.json']
  assert sorted(os.listdir(tmp_path / 'q')) == ['config.json', 'generation_config.json', 'model.safetensors']
  assert open(tmp_path / 'q' / 'generation_config.json').read() == open(
      os.path.join(model.path, 'generation_config.json')).read()


def test_tokenizer_files_are_copied_and_dtype_follows(models, tmp_path):
  model = models['qwen2']
  source = tmp_path / 'src'
  source.mkdir()
  for f in os.listdir(model.path):
    os.symlink(os.path.join(model.path, f), source / f)
  for f in ('tokenizer_config.json', 'chat_template.jinja', 'vocab.json', 'merges.txt'):
    (source / f).write_text(f'{{"file": "{f}"}}')
  spec = G8.replace(scale_dtype='bfloat16')
  info = ct.save_compressed_tensors(str(tmp_path / 'q'), model.params, _qtensors(model, spec), model.config,
                                    source=str(source), dtype='bfloat16')
  assert info['copied'] == ['generation_config.json', 'tokenizer_config.json', 'vocab.json', 'merges.txt',
                            'chat_template.jinja']
  for f in info['copied'][1:]:
    assert (tmp_path / 'q' / f).read_text() == f'{{"file": "{f}"}}'
  written = json.load(open(tmp_path / 'q' / 'config.json'))
  assert written['dtype'] == 'bfloat16' and 'torch_dtype' not in written   # the source's key, now the written dtype
  assert info['tensors']['model.layers.0.self_attn.q_proj.bias'] == 'bfloat16'


@pytest.mark.parametrize('family', FAMILIES)
def test_a_config_json_from_the_decoder_config_alone(models, tmp_path, family):
  """Without source=: config.json made from the DecoderConfig reads back to the same config."""
  model = models[family]
  ct.save_compressed_tensors(str(tmp_path / 'q'), model.params, _qtensors(model, G8), model.config)
  written = json.load(open(tmp_path / 'q' / 'config.json'))
  assert hf.decoder_config(written) == model.config
  assert written['architectures'] == [ct.ARCHITECTURES[model.config.model_type]]
  assert written['torch_dtype'] == 'float32' and written['max_position_embeddings'] == ct.MAX_POSITIONS
  assert sorted(os.listdir(tmp_path / 'q')) == ['config.json', 'model.safetensors']


def test_hand_made_decoder_configs_read_back():
  """DecoderConfigs not from a file: the tests' default, Mistral without a window, Gemma without an attention scalar
  (head_dim ** -0.5, written as query_pre_attn_scalar=head_dim), a Llama with biases."""
  import dataclasses
  from flexround_jax.models import decoder
  gemma = hf.decoder_config(json.load(open(os.path.join(FIXTURES, 'gemma3', 'config.json'))))
  for config in (decoder.DecoderConfig(), decoder.DecoderConfig(model_type='mistral'),
                 dataclasses.replace(gemma, query_pre_attn_scalar=None),
                 decoder.DecoderConfig(qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=False)):
    written = ct.decoder_config_json(config)
    assert not ct._differ(config, hf.decoder_config(written)), config  # pylint: disable=protected-access
  assert ct.decoder_config_json(dataclasses.replace(gemma, query_pre_attn_scalar=None))['query_pre_attn_scalar'] == 24


def test_untied_lm_head_can_be_quantized(models, tmp_path):
  model = models['llama']
  qts = _qtensors(model, G8, lm_head=True)
  info = ct.save_compressed_tensors(str(tmp_path / 'q'), model.params, qts, model.config)
  assert 'lm_head.weight_packed' in info['tensors'] and 'lm_head.weight' not in info['tensors']
  q = json.load(open(tmp_path / 'q' / 'config.json'))['quantization_config']
  assert q['ignore'] == []
  del qts['layers_1/mlp/up_proj/kernel']
  ct.save_compressed_tensors(str(tmp_path / 'q'), model.params, qts, model.config, overwrite=True)
  q = json.load(open(tmp_path / 'q' / 'config.json'))['quantization_config']
  assert q['ignore'] == ['model.layers.1.mlp.up_proj']


def test_unexpressible_params_and_configs_are_named(models, tmp_path):
  import dataclasses
  out = str(tmp_path / 'x')
  model = models['qwen2']
  config, params = model.config, model.params
  q = 'layers_0/attn/q_proj/kernel'
  good = _qtensors(model, G8)
  for name, why in [('layers_0/attn/q_proj/bias', 'HF model.layers.0.self_attn.q_proj.bias'),
                    ('embed_tokens/embedding', 'HF model.embed_tokens.weight'),
                    ('layers_0/attn/o_proj/bias', 'no such param'),   # Qwen2 has no o_proj bias
                    ('lm_head/kernel', 'no such param')]:             # tied
    with pytest.raises(ValueError, match=f"qtensors name '{name}', which is not a projection kernel of "
                                         rf'Decoder\(config\) \(qwen2\) \({why}'):
      ct.save_compressed_tensors(out, params, {name: good[q]}, config)
  gemma = models['gemma3']
  with pytest.raises(ValueError, match=r"qtensors name 'layers_1/attn/k_norm/scale'.*\(gemma3_text\) \(HF "
                                       r'model.layers.1.self_attn.k_norm.weight'):
    ct.save_compressed_tensors(out, gemma.params, {'layers_1/attn/k_norm/scale': good[q]}, gemma.config)
  o = 'layers_0/attn/o_proj/kernel'   # Gemma 3's o_proj has 72 inputs
  g16 = G8.replace(group_size=16)
  one = {o: rtn.finalize(jnp.asarray(gemma.params['layers_0']['attn']['o_proj']['kernel']),
                         rtn.init(jnp.asarray(gemma.params['layers_0']['attn']['o_proj']['kernel']), g16), g16)}
  with pytest.raises(ValueError, match=f'kernel {o}: group_size=16 does not divide its 72 inputs'):
    ct.save_compressed_tensors(out, gemma.params, one, gemma.config)
  with pytest.raises(ValueError, match=r'params hold layers_0/attn/o_proj/bias, which is not a param of '
                                       r'Decoder\(config\) \(qwen2\)'):
    bad = jax.tree.map(lambda a: a, params)
    bad['layers_0']['attn']['o_proj']['bias'] = np.zeros(48, np.float32)
    ct.save_compressed_tensors(out, bad, good, config)

  # A DecoderConfig of no known family, and one its family's config.json cannot say.
  with pytest.raises(ValueError, match=r"DecoderConfig.model_type='phi3' is not a Hugging Face family this "
                                       'exporter writes'):
    ct.save_compressed_tensors(out, params, good, dataclasses.replace(config, model_type='phi3'))
  with pytest.raises(ValueError, match=r"DecoderConfig fields \['qkv_bias'\] cannot be written in a qwen2 "
                                       'config.json .*qkv_bias=True'):
    ct.decoder_config_json(dataclasses.replace(config, qkv_bias=False))
  with pytest.raises(ValueError, match=r"DecoderConfig fields \['rope_local'\] cannot be written in a llama"):
    ct.decoder_config_json(dataclasses.replace(models['llama'].config, rope_local=gemma.config.rope))
  # A source folder that is not this model's, or no checkpoint at all; source= of a LlamaConfig.
  with pytest.raises(ValueError, match=f'source {models["qwen3"].path}: its config.json describes another model '
                                       'than config .*head_dim: 16 here, 24 there'):
    ct.save_compressed_tensors(out, params, good, config, source=models['qwen3'].path)
  with pytest.raises(ValueError, match='is the source folder; write the export to another folder'):
    ct.save_compressed_tensors(model.path, params, good, config, source=model.path, overwrite=True)
  with pytest.raises(ValueError, match='has no config.json'):
    ct.save_compressed_tensors(out, params, good, config, source=str(tmp_path))
  from flexround_jax.models import llama
  with pytest.raises(ValueError, match='source= needs a DecoderConfig'):
    ct.save_compressed_tensors(out, params, good, llama.LlamaConfig(), source=model.path)
  assert os.listdir(tmp_path) == []   # nothing written, no temporary folder left


@pytest.mark.parametrize('family', FAMILIES)
def test_our_safetensors_round_trip(models, tmp_path, family):
  """Our own format: a quantized fixture (biases, q/k norms, Gemma norms, memory-mapped params) reloads bit for bit
  and gives the same logits."""
  model = models[family]
  qts = _qtensors(model, C4 if family == 'qwen3' else G8)
  path = str(tmp_path / 'm.safetensors')
  fr.export.save_safetensors(path, model.params, qts)
  loaded = fr.export.load_safetensors(path)
  assert set(loaded.qtensors) == set(qts)
  for name, qt in qts.items():
    got = loaded.qtensors[name]
    assert got.spec == qt.spec
    for field in ('codes', 'scale', 'zero_point'):
      np.testing.assert_array_equal(getattr(got, field), getattr(qt, field), err_msg=f'{name} {field}')
  want, got = treepath.flatten(model.params), treepath.flatten(loaded.params)
  assert set(got) == set(want)
  for name in set(want) - set(qts):
    assert got[name].dtype == want[name].dtype
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  tokens = _tokens(family)[:, :16]
  np.testing.assert_array_equal(_fake_quant_logits(model, loaded.qtensors, tokens),
                                _fake_quant_logits(model, qts, tokens))


# --- with torch (make deploy) ----------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def written(models, tmp_path_factory):
  """{(family, variant): (folder, qtensors)}: 'g8' (untied heads quantized too), 'c4' with source=, 'generated'
  (G8, config.json from the DecoderConfig alone)."""
  pytest.importorskip('compressed_tensors', reason=NEEDS)
  pytest.importorskip('transformers', reason=NEEDS)
  root = tmp_path_factory.mktemp('hf_ct')
  out = {}
  for family, model in models.items():
    for variant in ('g8', 'c4', 'generated'):
      qts = _qtensors(model, C4 if variant == 'c4' else G8, lm_head=variant == 'g8')
      folder = str(root / f'{family}-{variant}')
      ct.save_compressed_tensors(folder, model.params, qts, model.config,
                                 source=None if variant == 'generated' else model.path)
      out[family, variant] = folder, qts
  return out


@pytest.mark.parametrize('variant', ['g8', 'c4'])
@pytest.mark.parametrize('family', FAMILIES)
def test_compressed_tensors_decompresses_exactly_our_weights(models, written, family, variant):
  import torch
  from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
  from safetensors.torch import load_file
  model = models[family]
  folder, qts = written[family, variant]
  dense = CompressedTensorsDequantizer(folder, dtype=torch.float32).validate(load_file(f'{folder}/model.safetensors'))
  flat = treepath.flatten(model.params)
  expected = {(n + '.weight' if p.endswith('/kernel') else n): p for p, n in ct.hf_names(model.config).items()}
  assert set(dense) == set(expected)
  for name, path in expected.items():
    want = np.asarray(qts[path].dequantize() if path in qts else flat[path])
    np.testing.assert_array_equal(dense[name].numpy(), want.T if path.endswith('/kernel') else want, err_msg=name)


@pytest.mark.filterwarnings('ignore:You passed `quantization_config`:UserWarning')   # dequantize=True, on purpose
@pytest.mark.parametrize('variant', ['g8', 'c4', 'generated'])
@pytest.mark.parametrize('family', FAMILIES)
def test_transformers_logits_equal_our_fake_quant_forward(models, written, family, variant):
  import torch
  import transformers
  model = models[family]
  folder, qts = written[family, variant]
  kwargs = {}
  if variant == 'c4':   # transformers 5 + compressed-tensors 0.20 load asymmetric channel/group grids only this way
    kwargs['quantization_config'] = transformers.CompressedTensorsConfig(dequantize=True)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
  assert type(theirs).__name__ == json.load(open(f'{folder}/config.json'))['architectures'][0]
  tokens = _tokens(family)
  with torch.no_grad():
    got = theirs(torch.tensor(tokens)).logits.numpy()
  want = _fake_quant_logits(model, qts, tokens)
  assert got.dtype == np.float32 and got.shape == want.shape
  assert _relative_error(got, want) < RTOL, _relative_error(got, want)
