"""compressed-tensors export (vLLM, transformers): a decoder as an HF checkpoint folder, kernels 'pack-quantized'.

Two kinds of model: the SmolLM2 ``models.llama.Llama`` (``LlamaConfig``; config.json made from the config, below)
and a Hugging Face family decoder (``models.decoder.Decoder``, a ``DecoderConfig`` from ``models.load_hf``: Llama,
Mistral, Qwen2, Qwen3, Gemma 3). For the latter tensor names are the family's own (``hf.hf_param_names``: biases,
q/k norms, Gemma's four norms per layer, ``lm_head.weight`` when untied); config.json is the source checkpoint's
(``source=``, every field kept; a multimodal Gemma 3 source gives its ``text_config`` as a ``Gemma3ForCausalLM``:
only the text model is written) or, without a source, one written from the ``DecoderConfig`` (``decoder_config_json``)
that ``hf.decoder_config`` reads back to the same config; either way with ``torch_dtype`` / ``dtype`` set to the
written dtype and this ``quantization_config``. With ``source=`` its tokenizer files and generation_config.json are
copied (``COPIED``). The layout below is the same for both kinds.

The folder is what compressed-tensors 0.20 itself writes (``ModelCompressor.compress_model`` + ``save_pretrained`` +
``update_config``, as llm-compressor saves weight-only int models) for the same codes and grids, tensor for tensor:
  config.json        HF ``LlamaForCausalLM`` config (legacy keys ``rope_theta`` / ``torch_dtype``, read by
                     transformers 4 and 5 and vLLM; a ``DecoderConfig``: see above) with ``quantization_config``:
                     quant_method 'compressed-tensors', format 'pack-quantized', status 'compressed', one config
                     group per distinct grid (bits, granularity, group_size, symmetric), targets ['Linear'] for a
                     single grid, else the module names; ignore: the projections without a QTensor, then
                     'lm_head' (tied to the embedding, or left dense; an untied ``lm_head/kernel`` with a QTensor
                     is quantized like a projection).
  model.safetensors  HF names and layout: weight (out, in) = Flax kernel.T (q/k rows in rotate-half order, as ours).
    <module>.weight_packed      int32 (out, ceil(in * b / 32)): each row a little-endian bit stream in 32-bit words,
                                value j at bits [j b, (j + 1) b); value = code + 2**(b-1) (symmetric) or the uint
                                code (asymmetric), i.e. compressed-tensors' signed q = value - 2**(b-1)
    <module>.weight_scale       ``dtype``: (out, in / g) per group, (out, 1) per channel, (1,) per tensor
    <module>.weight_zero_point  asymmetric only: per group / channel int32 (ceil(out * b / 32), groups), the uint zero
                                points packed as above along the output axis; per tensor int8 (1,), zp - 2**(b-1)
    <module>.weight_shape       int64 [out, in]
    other tensors               model.embed_tokens.weight, model.norm.weight, model.layers.N.{input,
                                post_attention}_layernorm.weight (and the family's biases, q/k norms, Gemma's
                                pre/post_feedforward_layernorm, lm_head.weight), unquantized projections' .weight,
                                in ``dtype``
compressed-tensors dequantizes W = scale * (q - zero_point) in the scale's dtype: with ``dtype='float32'`` that is
``QTensor.dequantize()`` bit for bit; with float16 / bfloat16 it is that value rounded once to the dtype (a scale
exact in the dtype times an integer |q - zp| < 2**8 is exact in float32).

Refused with a ValueError naming the kernel, before anything is written: per-group grids whose group size does not
divide the kernel's inputs (the format has no shorter last group), scales ``dtype`` cannot hold
(``spec.scale_dtype`` must equal ``dtype`` unless ``dtype='float32'``), QTensors of a transposed view (``axes``) and
QTensors of params that are no projection kernel (embeddings, norms, biases, names the family map does not know).
Readers differ in what they take: compressed-tensors decompresses 2..8 bits and all three granularities;
transformers 5 (``from_pretrained``) loads asymmetric per-group / per-channel grids only with
``CompressedTensorsConfig(dequantize=True)`` and one config group (compressed-tensors 0.20 shapes their zero points
unpacked on the meta model); vLLM's WNA16 kernels take 4 and 8 bits, per-channel or per-group grids, one grid for
q/k/v and one for gate/up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np

from flexround_jax import integrity, treepath
from flexround_jax import qtensor as qtensor_lib
from flexround_jax.export import grid
from flexround_jax.qtensor import QTensor

FORMAT = 'pack-quantized'
SCHEMA_VERSION = '0.20.0'    # the compressed-tensors release whose config writer this follows
DTYPES = ('float32', 'float16', 'bfloat16')
_STRATEGY = {'per_group': 'group', 'per_channel': 'channel', 'per_tensor': 'tensor'}
_TOP = {'embed_tokens/embedding': 'model.embed_tokens.weight', 'norm/scale': 'model.norm.weight'}
_BLOCK = {'input_layernorm/scale': 'input_layernorm.weight',
          'post_attention_layernorm/scale': 'post_attention_layernorm.weight',
          **{f'attn/{p}/kernel': f'self_attn.{p}' for p in ('q_proj', 'k_proj', 'v_proj', 'o_proj')},
          **{f'mlp/{p}/kernel': f'mlp.{p}' for p in ('gate_proj', 'up_proj', 'down_proj')}}


# The architecture written for each ``DecoderConfig.model_type`` (a multimodal Gemma 3 source: its text model).
ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
                 'qwen3': 'Qwen3ForCausalLM', 'gemma3_text': 'Gemma3ForCausalLM'}
# The files of a ``source`` folder copied into the export, those it has (tokenizer, chat template, generation).
COPIED = ('generation_config.json', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
          'tokenizer.model', 'vocab.json', 'merges.txt', 'added_tokens.json', 'chat_template.jinja',
          'chat_template.json')
MAX_POSITIONS = 8192   # max_position_embeddings of a config.json written without a source (not in a DecoderConfig)


def _is_decoder(config) -> bool:
  from flexround_jax.models import decoder  # pylint: disable=g-import-not-at-top
  return isinstance(config, decoder.DecoderConfig)


def _model_name(config) -> str:
  return f'Decoder(config) ({config.model_type})' if _is_decoder(config) else 'Llama(config)'


def hf_names(config) -> dict[str, str]:
  """{Flax param path: HF name} of every param of the model of ``config`` (``LlamaConfig``: ``Llama``;
  ``DecoderConfig``: ``Decoder``, named by its family's map ``hf.hf_param_names``, an untied 'lm_head/kernel' last):
  tensor names for embedding, norms and biases ('model.norm.weight'), module names for kernels
  ('model.layers.0.self_attn.q_proj', 'lm_head')."""
  if _is_decoder(config):
    from flexround_jax.models import hf  # pylint: disable=g-import-not-at-top
    names = {'/'.join(path): name[:-len('.weight')] if path[-1] == 'kernel' else name
             for name, path in hf.hf_param_names(config).items()}
    return dict(sorted(names.items(), key=lambda item: item[0] == 'lm_head/kernel'))   # stable: model order
  names = dict(_TOP)
  for i in range(config.n_layers):
    names.update({f'layers_{i}/{path}': f'model.layers.{i}.{hf}' for path, hf in _BLOCK.items()})
  return names


def _param_shapes(config) -> dict[str, tuple[int, ...]]:
  """{param path: shape} of the model of ``config`` (abstract: nothing is allocated)."""
  if _is_decoder(config):
    from flexround_jax.models import hf  # pylint: disable=g-import-not-at-top
    return {'/'.join(path): shape for path, shape in hf.param_shapes(config).items()}
  from flexround_jax.models import llama  # pylint: disable=g-import-not-at-top
  return {k: tuple(v.shape) for k, v in treepath.flatten(jax.eval_shape(lambda: llama.make_llama(config)[1])).items()}


def hf_config(config, dtype: str = 'float32') -> dict:
  """HF ``LlamaForCausalLM`` config.json fields of ``LlamaConfig`` (tied embeddings, no biases, SiLU)."""
  return {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'hidden_size': config.dim,
          'intermediate_size': config.ffn_dim, 'num_hidden_layers': config.n_layers,
          'num_attention_heads': config.n_heads, 'num_key_value_heads': config.n_kv_heads,
          'head_dim': config.head_dim, 'hidden_act': 'silu', 'rms_norm_eps': float(config.norm_eps),
          'rope_theta': float(config.rope_base), 'rope_scaling': None,
          'max_position_embeddings': config.max_seq_len, 'vocab_size': config.vocab_size,
          'tie_word_embeddings': True, 'bos_token_id': config.bos_token_id, 'eos_token_id': config.eos_token_id,
          'attention_bias': False, 'mlp_bias': False, 'torch_dtype': dtype, 'use_cache': True}


def _rope_scaling(rope) -> dict | None:
  """transformers' ``rope_scaling`` dict of a ``Rope`` (None: no scaling)."""
  if rope.rope_type == 'default':
    return None
  out = {'rope_type': rope.rope_type, 'factor': rope.factor}
  if rope.rope_type == 'llama3':
    out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
               original_max_position_embeddings=rope.original_max_position_embeddings)
  return out


def _same_model(config):
  """``config`` with the fields that have several spellings of one forward written one way: explicit layer types,
  no sliding window when no layer slides, the attention scalar (None: head_dim)."""
  from flexround_jax.models import decoder  # pylint: disable=g-import-not-at-top
  types = tuple(config.layer_type(i) for i in range(config.num_layers))
  return dataclasses.replace(
      config, layer_types=types, sliding_window=config.sliding_window if decoder.SLIDING in types else None,
      query_pre_attn_scalar=float(config.head_dim if config.query_pre_attn_scalar is None
                                  else config.query_pre_attn_scalar))


def _differ(config, other) -> dict:
  """{field: (config's value, other's)} of the fields where two DecoderConfigs give different forwards."""
  a, b = _same_model(config), _same_model(other)
  return {f.name: (getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
          if getattr(a, f.name) != getattr(b, f.name)}


def decoder_config_json(config) -> dict:
  """HF config.json fields of a ``DecoderConfig`` of a known family (``ARCHITECTURES``), checked to read back
  (``hf.decoder_config``) to the same forward: sizes, ``rms_norm_eps``, ``tie_word_embeddings``, the legacy RoPE keys
  ``rope_theta`` / ``rope_scaling`` (Gemma 3: + ``rope_local_base_freq``) that transformers 4 and 5 and vLLM read,
  ``hidden_act`` / ``hidden_activation``, the family's bias switches, ``sliding_window``, ``layer_types`` (Qwen2 /
  Qwen3: with ``use_sliding_window``, ``max_window_layers``), Gemma's ``query_pre_attn_scalar``. A DecoderConfig
  holds no token ids (not written) nor ``max_position_embeddings`` (written as ``MAX_POSITIONS``): pass the source
  folder to ``save_compressed_tensors`` to keep the checkpoint's own.

  Raises:
    ValueError naming ``model_type`` if it is not a known family, or the fields a config.json of its family cannot
    express (a Qwen2 without q/k/v biases, RoPE scaling on Gemma's sliding layers, a Llama sliding window, ...).
  """
  from flexround_jax.models import decoder, hf  # pylint: disable=g-import-not-at-top
  c = config
  if c.model_type not in ARCHITECTURES:
    raise ValueError(f'DecoderConfig.model_type={c.model_type!r} is not a Hugging Face family this exporter writes '
                     f'(known: {", ".join(ARCHITECTURES)})')
  gemma, qwen = c.model_type == 'gemma3_text', c.model_type in ('qwen2', 'qwen3')
  types = [c.layer_type(i) for i in range(c.num_layers)]
  out = {'architectures': [ARCHITECTURES[c.model_type]], 'model_type': c.model_type, 'vocab_size': c.vocab_size,
         'hidden_size': c.hidden_size, 'intermediate_size': c.intermediate_size, 'num_hidden_layers': c.num_layers,
         'num_attention_heads': c.num_heads, 'num_key_value_heads': c.num_kv_heads, 'head_dim': c.head_dim,
         'rms_norm_eps': float(c.norm_eps), 'tie_word_embeddings': c.tie_embeddings,
         'max_position_embeddings': MAX_POSITIONS, 'rope_theta': float(c.rope.base),
         'rope_scaling': _rope_scaling(c.rope), ('hidden_activation' if gemma else 'hidden_act'): c.activation,
         'use_cache': True}
  if c.model_type in ('llama', 'qwen3', 'gemma3_text'):
    out['attention_bias'] = c.qkv_bias
  if c.model_type == 'llama':
    out['mlp_bias'] = c.mlp_bias
  else:
    out['sliding_window'] = c.sliding_window if decoder.SLIDING in types else None
  if qwen or gemma:
    out['layer_types'] = types
  if qwen:
    out['use_sliding_window'] = decoder.SLIDING in types
    out['max_window_layers'] = types.index(decoder.SLIDING) if decoder.SLIDING in types else c.num_layers
  if gemma:
    out['rope_local_base_freq'] = float((c.rope_local or c.rope).base)
    scalar = _same_model(c).query_pre_attn_scalar   # an int where it is one: transformers 5 types it int
    out['query_pre_attn_scalar'] = int(scalar) if scalar.is_integer() else scalar
  try:
    diff = _differ(c, hf.decoder_config(out))
  except ValueError as e:
    raise ValueError(f'DecoderConfig ({c.model_type}) cannot be written as a config.json: {e}') from e
  if diff:
    raise ValueError(f'DecoderConfig fields {sorted(diff)} cannot be written in a {c.model_type} config.json (it '
                     f'would read back as {", ".join(f"{k}={v[1]!r}" for k, v in sorted(diff.items()))}); pass '
                     'source= a checkpoint folder whose config.json describes the model')
  return out


def _source_config_json(source: str, config) -> dict:
  """The config.json of the checkpoint folder ``source`` (a multimodal Gemma 3: its text_config as a
  ``Gemma3ForCausalLM``), without its ``quantization_config``; ValueError naming the folder unless it describes
  ``config``'s forward."""
  from flexround_jax.models import hf  # pylint: disable=g-import-not-at-top
  config_json, source_config = hf.read_config(source)
  diff = _differ(config, source_config)
  if diff:
    raise ValueError(f'source {source}: its config.json describes another model than config (DecoderConfig fields '
                     f'{", ".join(f"{k}: {v[0]!r} here, {v[1]!r} there" for k, v in sorted(diff.items()))})')
  if config_json.get('model_type') == 'gemma3':   # multimodal: write the text model
    top = {k: config_json[k] for k in ('dtype', 'torch_dtype', 'transformers_version') if k in config_json}
    config_json = {**top, **config_json['text_config'], 'architectures': [ARCHITECTURES['gemma3_text']],
                   'model_type': 'gemma3_text'}
  config_json = dict(config_json)
  config_json.pop('quantization_config', None)
  return config_json


def check_grid(name: str, qt: QTensor, dtype: str) -> None:
  """Raises ValueError naming the kernel unless compressed-tensors can hold ``qt``'s grid with scales in ``dtype``."""
  spec, (n_in, _) = qt.spec, qt.shape
  if not grid.groups_divide(spec, n_in):
    raise ValueError(f'kernel {name}: group_size={spec.group_size} does not divide its {n_in} inputs; '
                     f'compressed-tensors has no shorter last group (use a group size that divides {n_in})')
  if dtype != 'float32' and spec.scale_dtype != dtype:
    raise ValueError(f'kernel {name}: scales of QuantSpec.scale_dtype={spec.scale_dtype!r} would be rounded when '
                     f"stored as {dtype}; quantize with scale_dtype={dtype!r} or save with dtype='float32'")
  if not grid.scales_exact(qt.scale, dtype).all():
    raise ValueError(f'kernel {name}: scale values are not exactly representable in {dtype} '
                     f'(spec.scale_dtype={spec.scale_dtype!r})')


def pack_int32(values: np.ndarray, bits: int) -> np.ndarray:
  """(rows, cols) unsigned values < 2**bits -> (rows, ceil(cols * bits / 32)) int32, compressed-tensors'
  ``pack_to_int32``: each row a little-endian bit stream, value j at bits [j bits, (j + 1) bits), zero-padded."""
  rows, cols = values.shape
  padded = np.zeros((rows, -(-cols // 32) * 32), np.uint8)   # whole 32-value groups: bits words each
  padded[:, :cols] = values
  planes = (padded[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
  words = np.packbits(planes.reshape(rows, -1), axis=-1, bitorder='little').view('<i4')
  return np.ascontiguousarray(words[:, :-(-cols * bits // 32)], np.int32)


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  return np.asarray(x).astype(ml_dtypes.bfloat16 if dtype == 'bfloat16' else np.dtype(dtype))


def _compress(qt: QTensor, dtype: str) -> dict[str, np.ndarray]:
  """{param name: array} of one kernel, compressed-tensors layout (module docstring)."""
  spec, (n_in, n_out) = qt.spec, qt.shape
  offset = 2 ** (spec.bits - 1)
  codes = np.asarray(qt.codes).T.astype(np.int16)                   # (out, in)
  scale = np.asarray(qt.scale, np.float32)
  scale = scale.reshape(1) if spec.granularity == 'per_tensor' else scale.reshape(-1, n_out).T   # (out, groups)
  out = {'weight_packed': pack_int32(codes + offset if spec.symmetric else codes, spec.bits),
         'weight_scale': np.ascontiguousarray(_cast(scale, dtype)),
         'weight_shape': np.array([n_out, n_in], np.int64)}
  if not spec.symmetric:
    zero_point = np.asarray(qt.zero_point)
    if spec.granularity == 'per_tensor':
      out['weight_zero_point'] = (zero_point.reshape(1) - offset).astype(np.int8)
    else:   # packed along the output axis: (groups, out) rows, stored transposed
      out['weight_zero_point'] = np.ascontiguousarray(pack_int32(zero_point.reshape(-1, n_out), spec.bits).T)
  return out


def _weights_args(spec) -> dict:
  """QuantizationArgs fields of one grid, as compressed-tensors' ``model_dump`` writes them."""
  return {'num_bits': spec.bits, 'type': 'int', 'symmetric': spec.symmetric, 'strategy': _STRATEGY[spec.granularity],
          'group_size': spec.group_size if spec.granularity == 'per_group' else None, 'dynamic': False}


def quantization_config(modules: dict[str, QTensor], projections: list[str]) -> dict:
  """config.json ``quantization_config`` for {HF module name: QTensor}, in compressed-tensors' schema: one config
  group per distinct grid, targets ['Linear'] for a single grid, else the module names; ignore: the ``projections``
  (every Linear module name, model order) without a QTensor, then 'lm_head' unless it is one of them (tied)."""
  grids: dict[tuple, list[str]] = {}
  for module, qt in modules.items():
    s = qt.spec
    grids.setdefault((s.bits, s.granularity, s.group_size, s.symmetric), []).append(module)
  groups = {f'group_{i}': {'targets': ['Linear'] if len(grids) == 1 else names,
                           'weights': _weights_args(modules[names[0]].spec), 'input_activations': None,
                           'output_activations': None, 'format': FORMAT}
            for i, names in enumerate(grids.values())}
  ignore = [p for p in projections if p not in modules] + ([] if 'lm_head' in projections else ['lm_head'])
  return {'config_groups': groups, 'format': FORMAT, 'global_compression_ratio': None, 'ignore': ignore,
          'kv_cache_scheme': None, 'moe_sparsity_config': None, 'quant_method': 'compressed-tensors',
          'quantization_status': 'compressed', 'sparsity_config': {}, 'transform_config': {},
          'version': SCHEMA_VERSION}


def save_compressed_tensors(directory: str, params, qtensors: dict[str, QTensor], config, overwrite: bool = False,
                            dtype: str = 'float32', *, source: str | os.PathLike | None = None, tokenizer=None,
                            config_fields: dict | None = None) -> dict:
  """Writes the model of ``config`` (``params`` with ``qtensors``) as a compressed-tensors checkpoint folder (above).

  Args:
    directory: the folder to write (built as '<directory>.tmp-<pid>' and renamed into place when complete).
    params: Flax params of the model, a linen dict or an nnx ``State`` (a kernel named in ``qtensors`` is written
      from its QTensor, only its shape is read here).
    qtensors: {projection kernel path ('layers_0/attn/q_proj/kernel'; a ``Decoder``'s untied 'lm_head/kernel' too):
      QTensor}; other kernels are written dense.
    config: a ``models.llama.LlamaConfig`` (``Llama``) or a ``models.decoder.DecoderConfig`` (``Decoder``, e.g.
      ``models.load_hf(path).config``).
    overwrite: replace an existing ``directory`` (moved aside, deleted once the new one is in place).
    dtype: ``torch_dtype``: the dtype of scales and unquantized tensors ('float32' keeps everything bit for bit;
      'float16' / 'bfloat16' need QTensors with that ``scale_dtype`` and round embeddings and norms).
    source: with a ``DecoderConfig``: the Hugging Face checkpoint folder it was loaded from (``HFModel.path``): its
      config.json is written (every field kept; a multimodal Gemma 3: its text model, ``Gemma3ForCausalLM``) and its
      ``COPIED`` files that exist are copied. Without it, config.json is ``decoder_config_json(config)``.
    tokenizer: a ``tokenizers.Tokenizer`` written as tokenizer.json (not with ``source``, whose own is copied).
    config_fields: config.json fields a ``DecoderConfig`` does not hold (``bos_token_id``, ``eos_token_id``,
      ``max_position_embeddings``, ...), set over the generated ones; a field that changes the forward is refused.

  Returns:
    {'tensors': {safetensors name: dtype}, 'file_bytes': size of model.safetensors, 'copied': [files from source]}.

  Raises:
    ValueError naming the param or kernel (not a param of the model, wrong shape, invalid QTensor, not a projection
    kernel, grid the format cannot hold), the config field or the source folder, and FileExistsError, before
    anything is written.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  directory = os.path.abspath(directory)
  if dtype not in DTYPES:
    raise ValueError(f'dtype must be one of {DTYPES}, got {dtype!r}')
  decoder = _is_decoder(config)
  source = None if source is None else os.fspath(source)
  if source is not None and not decoder:
    raise ValueError('source= needs a DecoderConfig (a model loaded by models.load_hf); a LlamaConfig writes its own '
                     'config.json')
  if source is not None and os.path.abspath(source) == directory:
    raise ValueError(f'{directory}: is the source folder; write the export to another folder (the params may be '
                     'memory-mapped from its files)')
  if (tokenizer is not None or config_fields) and not decoder:
    raise ValueError('tokenizer= / config_fields= need a DecoderConfig; a LlamaConfig writes its own config.json')
  if tokenizer is not None and source is not None:
    raise ValueError('pass tokenizer= or source= (whose tokenizer files are copied), not both')
  if os.path.lexists(directory) and not overwrite:
    raise FileExistsError(f'{directory} exists; pass overwrite=True to replace it')
  model = _model_name(config)
  if not decoder:
    hf_json = hf_config(config, dtype)
  else:
    hf_json = decoder_config_json(config) if source is None else _source_config_json(source, config)
    if config_fields:
      from flexround_jax.models import hf  # pylint: disable=g-import-not-at-top
      hf_json.update(config_fields)
      diff = _differ(config, hf.decoder_config(hf_json))
      if diff:
        raise ValueError(f'config_fields {sorted(config_fields)} change the model (DecoderConfig fields '
                         f'{sorted(diff)}); they may only add fields a DecoderConfig does not hold')
    keys = [k for k in ('torch_dtype', 'dtype') if k in hf_json] or ['torch_dtype']
    hf_json.update({k: dtype for k in keys})
  names = hf_names(config)
  shapes = _param_shapes(config)
  assert set(shapes) == set(names), f'hf_names out of step with {model}'
  flat = treepath.flatten_params(params, f'save_compressed_tensors {directory}')
  for path in sorted(set(flat) | set(shapes)):
    if path not in flat:
      raise ValueError(f'params lack {path} (HF {names[path]})')
    if path not in shapes:
      raise ValueError(f'params hold {path}, which is not a param of {model}')
    if tuple(np.shape(flat[path])) != shapes[path]:
      raise ValueError(f'param {path} has shape {np.shape(flat[path])}, {model} expects {shapes[path]}')
  kernels = {p for p in names if p.endswith('/kernel')}
  unknown = sorted(set(qtensors) - kernels)
  if unknown:
    why = (f'HF {names[unknown[0]]}: compressed-tensors quantizes Linear weights only' if unknown[0] in names
           else 'no such param')
    raise ValueError(f'qtensors name {unknown[0]!r}, which is not a projection kernel of {model} ({why})')
  copied = [f for f in COPIED if source is not None and os.path.isfile(os.path.join(source, f))]

  tensors, modules = {}, {}
  for path, hf in names.items():
    if path in qtensors:
      qt = qtensor_lib.validate(qtensors[path], f'kernel {path}')
      if qt.shape != shapes[path]:
        raise ValueError(f'kernel {path}: QTensor shape {qt.shape}, the param {shapes[path]}')
      if qt.axes is not None:
        raise ValueError(f'kernel {path}: QTensor.axes={qt.axes} (a transposed view); compressed-tensors holds Dense '
                         'kernels quantized in their (in, out) view')
      check_grid(path, qt, dtype)
      modules[hf] = qt
      tensors.update({f'{hf}.{part}': arr for part, arr in _compress(qt, dtype).items()})
    else:
      value = np.asarray(flat[path])
      if path in kernels:
        hf, value = f'{hf}.weight', value.T
      tensors[hf] = np.ascontiguousarray(_cast(value, dtype))
  if modules:
    hf_json['quantization_config'] = quantization_config(modules, [names[p] for p in names if p in kernels])


  def write(tmp):
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(hf_json, f, indent=2, sort_keys=True)
    for file in copied:
      shutil.copyfile(os.path.join(source, file), os.path.join(tmp, file))
    if tokenizer is not None:
      tokenizer.save(os.path.join(tmp, 'tokenizer.json'))

  integrity.write_in_place(directory, write)
  return {'tensors': {n: str(t.dtype) for n, t in tensors.items()},
          'file_bytes': os.path.getsize(os.path.join(directory, 'model.safetensors')), 'copied': copied}


def save_hf(directory: str, params, config, *, tokenizer=None, dtype: str = 'float32', overwrite: bool = False,
            source: str | os.PathLike | None = None, config_fields: dict | None = None) -> dict:
  """Writes an unquantized ``Decoder`` as a Hugging Face checkpoint folder that ``models.load_hf`` (and
  transformers) read back: config.json (``decoder_config_json(config)`` with ``config_fields``, or ``source``'s),
  model.safetensors (HF names, weights (out, in) in ``dtype``) and, with ``tokenizer``, tokenizer.json.

  ``save_compressed_tensors`` without QTensors: the same checks, the same atomic write, the same return value. A
  quantized model's fake-quant weights are written with ``save_hf(dir, fr.dequantize_params(params, qtensors),
  config)``.
  """
  return save_compressed_tensors(directory, params, {}, config, overwrite, dtype, source=source, tokenizer=tokenizer,
                                 config_fields=config_fields)
