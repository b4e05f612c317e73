"""Hugging Face checkpoint folders (``config.json`` + safetensors) as a ``decoder.Decoder`` and its params.

``load_hf(path)`` reads ``config.json`` (``decoder_config`` maps it, refusing what the decoder does not implement
before any weight is read), memory-maps ``model.safetensors`` or the shards named by ``model.safetensors.index.json``
(``weights.load_params``), and renames the tensors with one map (``hf_param_names``) that the config's switches
shape: ``model.layers.N.self_attn.q_proj.weight`` (torch layout (out, in)) -> ``layers_N/attn/q_proj/kernel``
((in, out), the transposed view). Knows nothing of quantization.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

from flax import traverse_util
import flax.linen as nn
import jax
import numpy as np

from flexround_jax import _extras, weights
from flexround_jax.models import decoder as decoder_lib
from flexround_jax.models.decoder import FULL, SLIDING, DecoderConfig, Rope

ARCHITECTURES = {'LlamaForCausalLM': 'llama', 'MistralForCausalLM': 'mistral', 'Qwen2ForCausalLM': 'qwen2',
                 'Qwen3ForCausalLM': 'qwen3', 'Gemma3ForCausalLM': 'gemma3_text',
                 'Gemma3ForConditionalGeneration': 'gemma3_text'}
# Multimodal checkpoints: the text decoder's tensors under these prefixes (the first is how transformers saves
# Gemma3ForConditionalGeneration, the second how it names them in memory) map to the CausalLM names; the vision
# tower and projector are not part of the decoder and are listed in ``HFModel.ignored``.
_TEXT_PREFIXES = (('language_model.model.', 'model.'), ('model.language_model.', 'model.'),
                  ('language_model.lm_head.', 'lm_head.'))
_VISION_PREFIXES = ('vision_tower.', 'multi_modal_projector.', 'model.vision_tower.', 'model.multi_modal_projector.')
_MULTIMODAL = ('Gemma3ForConditionalGeneration',)
MODEL_TYPES = ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma3_text', 'gemma3')
_ACTIVATION = {'gemma3_text': ('hidden_activation', 'gelu_pytorch_tanh')}   # others: ('hidden_act', 'silu')
# Fields whose non-empty value changes the math in a way the decoder does not implement.
_REFUSED_IF_SET = ('attn_logit_softcapping', 'final_logit_softcapping', 'num_experts', 'num_local_experts',
                   'n_routed_experts', 'moe_intermediate_size', 'num_experts_per_tok', 'use_bidirectional_attention')
# Non-persistent buffers that old checkpoints sometimes carry: skipped, never an error.
_BUFFER_SUFFIXES = ('.rotary_emb.inv_freq',)


def _refuse(field: str, value, why: str):
  raise ValueError(f'config.json: {field}={value!r} {why}')


def _rope(params: dict | None, theta_field: str, theta, max_pos: int, where: str) -> Rope:
  """A ``Rope`` from transformers' rope dict ({'rope_type' or 'type', 'rope_theta', 'factor', ...}) or None."""
  params = dict(params or {})
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if rope_type not in decoder_lib.ROPE_TYPES:
    _refuse(f'{where}.rope_type', rope_type, f'is not implemented (supported: {decoder_lib.ROPE_TYPES})')
  if float(params.get('partial_rotary_factor', 1.0)) != 1.0:
    _refuse(f'{where}.partial_rotary_factor', params['partial_rotary_factor'], 'is not implemented (only 1.0)')
  base = params.get('rope_theta', theta)
  if base is None:
    _refuse(theta_field, None, 'must be set (the RoPE base)')
  kw = {}
  if rope_type in ('linear', 'llama3'):
    if 'factor' not in params:
      _refuse(f'{where}.factor', None, f'must be set for rope_type {rope_type!r}')
    kw['factor'] = float(params['factor'])
  if rope_type == 'llama3':
    for k in ('low_freq_factor', 'high_freq_factor'):
      if k not in params:
        _refuse(f'{where}.{k}', None, "must be set for rope_type 'llama3'")
      kw[k] = float(params[k])
    kw['original_max_position_embeddings'] = int(params.get('original_max_position_embeddings', max_pos))
  return Rope(base=float(base), rope_type=rope_type, **kw)


def decoder_config(config_json: dict) -> DecoderConfig:
  """``DecoderConfig`` of a Hugging Face ``config.json`` dict (a ``gemma3`` multimodal config: its ``text_config``).

  Read: ``model_type`` (llama, mistral, qwen2, qwen3, gemma3_text), ``vocab_size``, ``hidden_size``,
  ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads`` (default: heads), ``head_dim`` (default:
  hidden / heads), ``intermediate_size``, ``rms_norm_eps``, ``tie_word_embeddings``, ``attention_bias`` (q/k/v/o
  biases; Qwen2 always has q/k/v biases and no o bias), ``mlp_bias`` (Llama), the RoPE base and scaling from
  ``rope_parameters`` (transformers 5; Gemma 3: one per layer type) or ``rope_theta`` + ``rope_scaling`` (older
  files; Gemma 3: ``rope_local_base_freq`` for sliding layers), ``max_position_embeddings`` (llama3 scaling's
  default original length), ``sliding_window`` (Mistral: every layer; Qwen2/Qwen3: only with ``use_sliding_window``,
  on layers >= ``max_window_layers``; Gemma 3: the sliding layers), ``layer_types`` or Gemma 3's
  ``sliding_window_pattern`` (default 6), ``query_pre_attn_scalar`` (Gemma 3), ``hidden_act`` (must be 'silu') /
  ``hidden_activation`` (Gemma 3: must be 'gelu_pytorch_tanh').

  Refused (ValueError naming the field and its value): another ``model_type``; a ``rope_type`` other than
  default / linear / llama3; ``partial_rotary_factor`` != 1; another activation; any of ``attn_logit_softcapping``,
  ``final_logit_softcapping``, MoE fields (``num_experts``, ``num_local_experts``, ``n_routed_experts``,
  ``moe_intermediate_size``, ``num_experts_per_tok``) or ``use_bidirectional_attention`` set (not None / 0 /
  False). Ignored (no effect on the forward): dropout, initializer, cache and token-id fields.
  """
  if not isinstance(config_json, dict):
    raise ValueError(f'config.json must be a JSON object, got {type(config_json).__name__}')
  d = config_json
  model_type = d.get('model_type')
  if model_type == 'gemma3':
    if not isinstance(d.get('text_config'), dict):
      _refuse('text_config', d.get('text_config'), "must be a JSON object for model_type 'gemma3'")
    d = {'model_type': 'gemma3_text', **d['text_config']}
    model_type = 'gemma3_text'
  if model_type not in MODEL_TYPES:
    _refuse('model_type', model_type, f'is not supported (supported: {", ".join(MODEL_TYPES[:-1])}, and gemma3 '
            'through its text_config)')
  for field in _REFUSED_IF_SET:
    if d.get(field):
      _refuse(field, d[field], 'is not implemented by flexround_jax.models.decoder (it would change the logits)')
  act_field, act = _ACTIVATION.get(model_type, ('hidden_act', 'silu'))
  if d.get(act_field, act) != act:
    _refuse(act_field, d[act_field], f'is not supported for {model_type} (only {act!r})')
  for field in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size'):
    if field not in d:
      _refuse(field, None, 'is missing')
  heads, hidden, layers = int(d['num_attention_heads']), int(d['hidden_size']), int(d['num_hidden_layers'])
  max_pos = int(d.get('max_position_embeddings', 8192))
  gemma = model_type == 'gemma3_text'

  rope_params = d.get('rope_parameters')
  nested = isinstance(rope_params, dict) and (FULL in rope_params or SLIDING in rope_params)
  if gemma:
    full = rope_params.get(FULL) if nested else (rope_params or d.get('rope_scaling'))
    local = rope_params.get(SLIDING) if nested else None
    rope = _rope(full, 'rope_theta', d.get('rope_theta', 1e6), max_pos, 'rope_parameters.full_attention')
    rope_local = _rope(local, 'rope_local_base_freq', d.get('rope_local_base_freq', 1e4), max_pos,
                       'rope_parameters.sliding_attention')
  else:
    if nested:
      _refuse('rope_parameters', rope_params, f'per layer type is not implemented for {model_type}')
    rope = _rope(rope_params or d.get('rope_scaling'), 'rope_theta', d.get('rope_theta', 1e4), max_pos,
                 'rope_parameters' if rope_params else 'rope_scaling')
    rope_local = None

  window = d.get('sliding_window')
  layer_types = d.get('layer_types')
  if model_type in ('qwen2', 'qwen3'):
    window = window if d.get('use_sliding_window', False) else None
    if layer_types is None:
      first = int(d.get('max_window_layers', 28))
      layer_types = [SLIDING if window is not None and i >= first else FULL for i in range(layers)]
  elif model_type == 'mistral':
    layer_types = None   # transformers' Mistral applies sliding_window (if set) to every layer, whatever layer_types
  elif gemma:
    if layer_types is None:
      pattern = int(d.get('sliding_window_pattern', 6))
      layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
  else:
    window, layer_types = None, None   # Llama has no sliding window
  if layer_types is not None and SLIDING not in layer_types:
    window = None

  attention_bias = bool(d.get('attention_bias', False))
  return DecoderConfig(
      vocab_size=int(d['vocab_size']), hidden_size=hidden, num_layers=layers, num_heads=heads,
      num_kv_heads=int(d.get('num_key_value_heads') or heads), head_dim=int(d.get('head_dim') or hidden // heads),
      intermediate_size=int(d['intermediate_size']), norm_eps=float(d.get('rms_norm_eps', 1e-6)),
      norm_unit_offset=gemma, sandwich_norms=gemma, qk_norm=model_type in ('qwen3', 'gemma3_text'),
      qkv_bias=attention_bias or model_type == 'qwen2', o_bias=attention_bias and model_type != 'qwen2',
      mlp_bias=bool(d.get('mlp_bias', False)) and model_type == 'llama',
      activation='gelu_pytorch_tanh' if gemma else 'silu', embed_scale=gemma,
      tie_embeddings=bool(d.get('tie_word_embeddings', gemma)), rope=rope, rope_local=rope_local,
      sliding_window=None if window is None else int(window),
      layer_types=None if layer_types is None else tuple(layer_types),
      query_pre_attn_scalar=float(d.get('query_pre_attn_scalar', 256)) if gemma else None, model_type=model_type)


def hf_param_names(config: DecoderConfig) -> dict[str, tuple[str, ...]]:
  """{HF tensor name: ``Decoder(config)`` param path} of every tensor the config reads (the same names for all five
  families; the switches decide which exist). Weights are torch (out, in); ``kernel`` paths take the transpose."""
  names = {'model.embed_tokens.weight': ('embed_tokens', 'embedding'), 'model.norm.weight': ('norm', 'scale')}
  if not config.tie_embeddings:
    names['lm_head.weight'] = ('lm_head', 'kernel')
  block = {'input_layernorm.weight': ('input_layernorm', 'scale'),
           'post_attention_layernorm.weight': ('post_attention_layernorm', 'scale')}
  if config.sandwich_norms:
    block.update({f'{n}.weight': (n, 'scale') for n in ('pre_feedforward_layernorm', 'post_feedforward_layernorm')})
  for proj in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
    block[f'self_attn.{proj}.weight'] = ('attn', proj, 'kernel')
    if (config.o_bias if proj == 'o_proj' else config.qkv_bias):
      block[f'self_attn.{proj}.bias'] = ('attn', proj, 'bias')
  if config.qk_norm:
    block.update({f'self_attn.{n}.weight': ('attn', n, 'scale') for n in ('q_norm', 'k_norm')})
  for proj in ('gate_proj', 'up_proj', 'down_proj'):
    block[f'mlp.{proj}.weight'] = ('mlp', proj, 'kernel')
    if config.mlp_bias:
      block[f'mlp.{proj}.bias'] = ('mlp', proj, 'bias')
  for i in range(config.num_layers):
    names.update({f'model.layers.{i}.{name}': (f'layers_{i}',) + path for name, path in block.items()})
  return names


def param_shapes(config: DecoderConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{param path: shape} of ``Decoder(config)``'s params (abstract: nothing is allocated)."""
  tree = jax.eval_shape(lambda: decoder_lib.make_decoder(config)[1])
  return {path: tuple(s.shape) for path, s in traverse_util.flatten_dict(tree).items()}


@dataclasses.dataclass(frozen=True)
class HFModel:
  """A loaded checkpoint: ``module`` (``Decoder``), ``apply_fn(params, tokens (B, T) int) -> logits (B, T, vocab)
  float32``, ``params`` (nested dicts of numpy arrays; memory-mapped where no cast or copy was needed), ``config``
  (``DecoderConfig``), ``tokenizer`` (``tokenizers.Tokenizer`` from tokenizer.json, or None), ``path`` and
  ``ignored`` (names of the file's tensors not loaded: a multimodal checkpoint's vision tower and projector, old
  rotary buffers)."""
  module: decoder_lib.Decoder
  apply_fn: Callable
  params: Any
  config: DecoderConfig
  tokenizer: Any
  path: str
  ignored: tuple[str, ...] = ()


def _text_name(name: str, multimodal: bool) -> str | None:
  """The CausalLM name of a checkpoint tensor, or None for one the decoder does not read (vision, buffers)."""
  if name.endswith(_BUFFER_SUFFIXES):
    return None
  if multimodal:
    if name.startswith(_VISION_PREFIXES):
      return None
    for old, new in _TEXT_PREFIXES:
      if name.startswith(old):
        return new + name[len(old):]
  return name


def read_config(path: str) -> tuple[dict, DecoderConfig]:
  """(config.json dict, ``DecoderConfig``) of a checkpoint folder; ValueError naming the folder / field if it has
  no config.json or an architecture or field the decoder does not implement. Reads no weight."""
  file = os.path.join(path, 'config.json')
  if not os.path.isdir(path):
    raise ValueError(f'{path}: not a folder (expected a Hugging Face checkpoint folder with config.json)')
  if not os.path.isfile(file):
    raise ValueError(f'{path}: has no config.json (expected a Hugging Face checkpoint folder)')
  try:
    with open(file, encoding='utf-8') as f:
      config_json = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{file}: not valid JSON ({e})') from e
  if not isinstance(config_json, dict):
    raise ValueError(f'{file}: not a JSON object')
  archs = config_json.get('architectures')
  if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
    raise ValueError(f'{file}: config.architectures={archs!r} is not supported (supported: '
                     f'{", ".join(ARCHITECTURES)})')
  try:
    config = decoder_config(config_json)
  except ValueError as e:
    raise ValueError(f'{file}: {e}') from e
  if config.model_type != ARCHITECTURES[archs[0]]:
    raise ValueError(f'{file}: config.architectures={archs!r} does not match model_type={config.model_type!r}')
  return config_json, config


def _shard_files(path: str) -> list[str]:
  """The safetensors files of a checkpoint folder: model.safetensors, or the shards its index names."""
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.isfile(index):
    try:
      with open(index, encoding='utf-8') as f:
        weight_map = json.load(f)['weight_map']
      shards = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f'{index}: not a safetensors index (a JSON object with a weight_map): {e!r}') from e
    for shard in shards:
      if os.path.basename(shard) != shard or not os.path.isfile(os.path.join(path, shard)):
        raise ValueError(f'{index}: shard {shard!r} is not a file in {path}')
    return [os.path.join(path, s) for s in shards]
  single = os.path.join(path, 'model.safetensors')
  if not os.path.isfile(single):
    raise ValueError(f'{path}: has neither model.safetensors nor model.safetensors.index.json')
  return [single]


def load_hf(path: str, dtype: Any = 'float32', *, stream: bool = False) -> HFModel:
  """Loads a Hugging Face checkpoint folder (Llama, Mistral, Qwen2, Qwen3, Gemma 3; see ``ARCHITECTURES``); of a
  multimodal Gemma 3 only the text decoder (its vision tensors are listed in ``HFModel.ignored``).

  ``config.json`` is checked first (``read_config``: an unsupported architecture or field is a ValueError before
  any weight is read), then every shard's header; the tensors must be exactly ``hf_param_names(config)`` with the
  shapes the config implies (missing, unexpected or misshapen tensors are a ValueError naming them; a tied model
  has no lm_head.weight). Tensors are memory-mapped; kernels are the transposed views; ``dtype`` (e.g. 'float32',
  'bfloat16') casts each tensor (a copy in memory where the stored dtype differs); ``dtype=None`` keeps every
  tensor as stored, so nothing is read until a computation touches it (the streaming path of ``weights``).

  ``stream=True`` is for checkpoints larger than RAM (a 7B model in bfloat16 is 13 GB, 27 GB in float32): every
  tensor stays memory-mapped as stored, whatever ``dtype``, and ``apply_fn`` computes in ``dtype`` instead (None:
  the stored dtype). Its embedding lookup is cast to ``dtype``, so each operation promotes the weights it uses
  where it uses them: one tensor is converted at a time, and the logits equal those of the eager ``dtype`` load
  (bfloat16 to float32 is exact). After each top-level module (embedding, decoder layer, norm, head) runs
  eagerly, the pages of its mapped tensors are dropped from the process's resident memory
  (``weights.release_pages``), so a forward over the whole model holds one layer's pages, not the file's.
  ``flexround_jax.quantize`` then reads one unit's tensors at a time (``QuantConfig.spill_dir`` for the rest);
  a unit re-applied alone computes in the dtype of its recorded inputs (``dtype``), with its quantized kernels
  rounded to the stored dtype, as for any model with bfloat16 params.
  """
  path = os.fspath(path)
  config_json, config = read_config(path)
  multimodal = config_json['architectures'][0] in _MULTIMODAL
  dtype = None if dtype is None else np.dtype(dtype)
  tensors, origin, ignored = {}, {}, []
  for file in _shard_files(path):
    for stored, array in weights.load_params(file).items():
      name = _text_name(stored, multimodal)
      if name is None:
        ignored.append(stored)
        continue
      if name in tensors:
        raise ValueError(f'{file}: tensor {stored!r} is also in {origin[name][0]} (as {origin[name][1]!r})')
      tensors[name], origin[name] = array, (file, stored)
  names = hf_param_names(config)
  unexpected = sorted(n for n in tensors if n not in names)
  missing = sorted(set(names) - set(tensors))
  if missing or unexpected:
    tied = ' (tied embeddings: tie_word_embeddings is true, so there is no lm_head.weight)' if (
        'lm_head.weight' in unexpected) else ''
    raise ValueError(f'{path}: the tensors do not match its config.json ({config.model_type}, {config.num_layers} '
                     f'layers): missing {missing[:8]}{" ..." if len(missing) > 8 else ""}, unexpected '
                     f'{unexpected[:8]}{" ..." if len(unexpected) > 8 else ""}{tied}')
  shapes = param_shapes(config)
  flat = {}
  for name, param in names.items():
    w = tensors[name]
    want = shapes[param][::-1] if param[-1] == 'kernel' else shapes[param]
    if tuple(w.shape) != tuple(want):
      raise ValueError(f'{origin[name][0]}: tensor {origin[name][1]!r} has shape {tuple(w.shape)}, config.json '
                       f'implies {want}')
    w = w.T if param[-1] == 'kernel' else w
    flat[param] = w if stream or dtype is None or w.dtype == dtype else np.asarray(w, dtype)
  module = decoder_lib.Decoder(config)
  if stream:
    interceptor = _streaming_interceptor(dtype)

    def apply_fn(params, tokens):
      with nn.intercept_methods(interceptor):
        return module.apply({'params': params}, tokens)
  else:
    apply_fn = lambda params, tokens: module.apply({'params': params}, tokens)
  return HFModel(module=module, apply_fn=apply_fn,
                 params=traverse_util.unflatten_dict(flat), config=config, tokenizer=_tokenizer(path), path=path,
                 ignored=tuple(sorted(ignored)))


def _streaming_interceptor(dtype):
  """Flax method interceptor of ``load_hf(stream=True)``'s forward: casts the embedding lookup to ``dtype`` (None:
  unchanged) and, after each method of a top-level module, drops the pages of its memory-mapped params from the
  resident set (eager calls; under a trace the params are tracers and nothing is released)."""

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if dtype is not None and context.method_name == '__call__' and isinstance(module, nn.Embed):
      out = out.astype(dtype)
    if len(module.path) == 1:   # embed_tokens, layers_<i>, norm, lm_head
      weights.release_pages(module.variables.get('params', {}))
    return out
  return interceptor


def _tokenizer(path: str):
  """``tokenizers.Tokenizer`` of the folder's tokenizer.json, or None without one."""
  file = os.path.join(path, 'tokenizer.json')
  if not os.path.isfile(file):
    return None
  tokenizers = _extras.require('tokenizers', 'llm', 'the tokenizer of a Hugging Face checkpoint')
  try:
    return tokenizers.Tokenizer.from_file(file)
  except Exception as e:  # tokenizers raises a bare Exception on a bad file
    raise ValueError(f'{file}: not a readable tokenizer.json: {e}') from e
