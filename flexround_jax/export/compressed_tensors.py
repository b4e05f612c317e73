"""compressed-tensors export (vLLM, transformers): a Llama as an HF checkpoint folder, kernels 'pack-quantized'.

The folder is what compressed-tensors 0.20 itself writes (``ModelCompressor.compress_model`` + ``save_pretrained`` +
``update_config``, as llm-compressor saves weight-only int models) for the same codes and grids, tensor for tensor:
  config.json        HF ``LlamaForCausalLM`` config (legacy keys ``rope_theta`` / ``torch_dtype``, read by
                     transformers 4 and 5 and vLLM) with ``quantization_config``: quant_method 'compressed-tensors',
                     format 'pack-quantized', status 'compressed', one config group per distinct grid (bits,
                     granularity, group_size, symmetric), targets ['Linear'] for a single grid, else the module
                     names; ignore: the projections without a QTensor, then 'lm_head' (tied to the embedding).
  model.safetensors  HF names and layout: weight (out, in) = Flax kernel.T (q/k rows in rotate-half order, as ours).
    <module>.weight_packed      int32 (out, ceil(in * b / 32)): each row a little-endian bit stream in 32-bit words,
                                value j at bits [j b, (j + 1) b); value = code + 2**(b-1) (symmetric) or the uint
                                code (asymmetric), i.e. compressed-tensors' signed q = value - 2**(b-1)
    <module>.weight_scale       ``dtype``: (out, in / g) per group, (out, 1) per channel, (1,) per tensor
    <module>.weight_zero_point  asymmetric only: per group / channel int32 (ceil(out * b / 32), groups), the uint zero
                                points packed as above along the output axis; per tensor int8 (1,), zp - 2**(b-1)
    <module>.weight_shape       int64 [out, in]
    other tensors               model.embed_tokens.weight, model.norm.weight, model.layers.N.{input,
                                post_attention}_layernorm.weight, unquantized projections' .weight, in ``dtype``
compressed-tensors dequantizes W = scale * (q - zero_point) in the scale's dtype: with ``dtype='float32'`` that is
``QTensor.dequantize()`` bit for bit; with float16 / bfloat16 it is that value rounded once to the dtype (a scale
exact in the dtype times an integer |q - zp| < 2**8 is exact in float32).

Refused with a ValueError naming the kernel, before anything is written: per-group grids whose group size does not
divide the kernel's inputs (the format has no shorter last group) and scales ``dtype`` cannot hold
(``spec.scale_dtype`` must equal ``dtype`` unless ``dtype='float32'``). Readers differ in what they take:
compressed-tensors decompresses 2..8 bits and all three granularities; transformers 5 (``from_pretrained``) loads
asymmetric per-group / per-channel grids only with ``CompressedTensorsConfig(dequantize=True)`` and one config group
(compressed-tensors 0.20 shapes their zero points unpacked on the meta model); vLLM's WNA16 kernels take 4 and 8
bits, per-channel or per-group grids, one grid for q/k/v and one for gate/up.
"""

from __future__ import annotations

import json
import os

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


def hf_names(config) -> dict[str, str]:
  """{Flax param path: HF name} of every param of ``Llama(config)``: tensor names for embedding and norms
  ('model.norm.weight'), module names for projection kernels ('model.layers.0.self_attn.q_proj')."""
  names = dict(_TOP)
  for i in range(config.n_layers):
    names.update({f'layers_{i}/{path}': f'model.layers.{i}.{hf}' for path, hf in _BLOCK.items()})
  return names


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
  (every Linear module name, model order) without a QTensor, then 'lm_head'."""
  grids: dict[tuple, list[str]] = {}
  for module, qt in modules.items():
    s = qt.spec
    grids.setdefault((s.bits, s.granularity, s.group_size, s.symmetric), []).append(module)
  groups = {f'group_{i}': {'targets': ['Linear'] if len(grids) == 1 else names,
                           'weights': _weights_args(modules[names[0]].spec), 'input_activations': None,
                           'output_activations': None, 'format': FORMAT}
            for i, names in enumerate(grids.values())}
  ignore = [p for p in projections if p not in modules] + ['lm_head']
  return {'config_groups': groups, 'format': FORMAT, 'global_compression_ratio': None, 'ignore': ignore,
          'kv_cache_scheme': None, 'moe_sparsity_config': None, 'quant_method': 'compressed-tensors',
          'quantization_status': 'compressed', 'sparsity_config': {}, 'transform_config': {},
          'version': SCHEMA_VERSION}


def save_compressed_tensors(directory: str, params, qtensors: dict[str, QTensor], config, overwrite: bool = False,
                            dtype: str = 'float32') -> dict:
  """Writes ``Llama(config)``'s ``params`` with ``qtensors`` as a compressed-tensors checkpoint folder (see above).

  Args:
    directory: the folder to write (built as '<directory>.tmp-<pid>' and renamed into place when complete).
    params: Flax params of ``models.llama.Llama(config)``, a linen dict or an nnx ``State`` (a kernel named in
      ``qtensors`` is written from its QTensor, only its shape is read here).
    qtensors: {projection kernel path ('layers_0/attn/q_proj/kernel'): QTensor}; other kernels are written dense.
    config: the ``models.llama.LlamaConfig``.
    overwrite: replace an existing ``directory`` (moved aside, deleted once the new one is in place).
    dtype: ``torch_dtype``: the dtype of scales and unquantized tensors ('float32' keeps everything bit for bit;
      'float16' / 'bfloat16' need QTensors with that ``scale_dtype`` and round embeddings and norms).

  Returns:
    {'tensors': {safetensors name: dtype}, 'file_bytes': size of model.safetensors}.

  Raises:
    ValueError naming the param or kernel (not a param of ``Llama(config)``, wrong shape, invalid QTensor, grid the
    format cannot hold) and FileExistsError, before anything is written.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from flexround_jax.models import llama  # pylint: disable=g-import-not-at-top

  directory = os.path.abspath(directory)
  if dtype not in DTYPES:
    raise ValueError(f'dtype must be one of {DTYPES}, got {dtype!r}')
  if os.path.lexists(directory) and not overwrite:
    raise FileExistsError(f'{directory} exists; pass overwrite=True to replace it')
  names = hf_names(config)
  shapes = {k: tuple(v.shape) for k, v in treepath.flatten(jax.eval_shape(lambda: llama.make_llama(config)[1])).items()}
  assert set(shapes) == set(names), 'hf_names out of step with models.llama'
  flat = treepath.flatten_params(params, f'save_compressed_tensors {directory}')
  for path in sorted(set(flat) | set(shapes)):
    if path not in flat:
      raise ValueError(f'params lack {path} (HF {names[path]})')
    if path not in shapes:
      raise ValueError(f'params hold {path}, which is not a param of Llama(config)')
    if tuple(np.shape(flat[path])) != shapes[path]:
      raise ValueError(f'param {path} has shape {np.shape(flat[path])}, Llama(config) expects {shapes[path]}')
  kernels = {p for p in names if p.endswith('/kernel')}
  unknown = sorted(set(qtensors) - kernels)
  if unknown:
    raise ValueError(f'qtensors name {unknown[0]!r}, which is not a projection kernel of Llama(config)')

  tensors, modules = {}, {}
  for path, hf in names.items():
    if path in qtensors:
      qt = qtensor_lib.validate(qtensors[path], f'kernel {path}')
      if qt.shape != shapes[path]:
        raise ValueError(f'kernel {path}: QTensor shape {qt.shape}, the param {shapes[path]}')
      check_grid(path, qt, dtype)
      modules[hf] = qt
      tensors.update({f'{hf}.{part}': arr for part, arr in _compress(qt, dtype).items()})
    else:
      value = np.asarray(flat[path])
      if path in kernels:
        hf, value = f'{hf}.weight', value.T
      tensors[hf] = np.ascontiguousarray(_cast(value, dtype))
  hf_json = hf_config(config, dtype)
  if modules:
    hf_json['quantization_config'] = quantization_config(modules, [names[p] for p in names if p in kernels])


  def write(tmp):
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(hf_json, f, indent=2, sort_keys=True)

  integrity.write_in_place(directory, write)
  return {'tensors': {n: str(t.dtype) for n, t in tensors.items()},
          'file_bytes': os.path.getsize(os.path.join(directory, 'model.safetensors'))}
