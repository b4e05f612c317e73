"""Intel AutoRound's packed integer checkpoints read back into our QTensors, in numpy (no torch, no auto-round).

``AutoRound(...).save_quantized(dir, format='auto_round:gptqmodel')`` (or ``'auto_round'``) writes, for each quantized ``nn.Linear`` of weight
(out, in) at b bits with groups of g input channels (``group_size=-1``: g = in, one group per output channel),
three tensors next to its name in the safetensors file (auto_round_extension.torch.qlinear_torch.QuantLinear.pack):

* ``qweight`` (in * b / 32, out) int32: for each output column, the codes of its ``in`` weights as one little-endian
  bit stream, code i at bits b*i .. b*i+b-1 of the column's 32-bit words (so 3-bit codes straddle words);
* ``qzeros`` (ceil(in / g), out * b / 32) int32: each group row's zero points, packed the same way along ``out``;
  packing formats ``auto_round`` and ``auto_round:gptqmodel`` store the zero point itself, ``auto_round:auto_gptq``
  (AutoRound's choice for symmetric grids) stores zero point - 1;
* ``scales`` (ceil(in / g), out) float16;
* ``g_idx`` (in,) int32 (``auto_round:gptqmodel`` only): each input channel's group, i // g here (a permuted,
  act-order ``g_idx`` is refused).

W_hat[o, i] = scales[i // g, o] * (codes[i, o] - zeros[i // g, o]): our asymmetric ``QTensor`` (codes (in, out) in the
Flax layout, scale and zero point per group and output channel, ``QuantSpec(scale_dtype='float16')``), so
``QTensor.dequantize`` and ``engine.dequantize_params`` put AutoRound's grid into a ``Decoder``'s params unchanged.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from flexround_jax.models import hf
from flexround_jax.qtensor import QTensor, validate
from flexround_jax.spec import QuantSpec

PACKING_ZERO_OFFSET = {'auto_round': 0, 'auto_round:gptqmodel': 0, 'auto_round:auto_gptq': 1}   # zero point = stored + offset


def unpack_bitstream(words, bits: int) -> np.ndarray:
  """(..., n_words) int32 words holding a little-endian bit stream of ``bits``-bit codes -> (..., n_words * 32 //
  bits) uint8 codes. The last axis must hold whole 32-code blocks (n_words a multiple of ``bits``)."""
  words = np.asarray(words)
  if words.dtype != np.int32 or words.ndim < 1 or words.shape[-1] % bits:
    raise ValueError(f'unpack_bitstream: need int32 words whose last axis is a multiple of bits={bits} '
                     f'(whole blocks of 32 codes), got {words.dtype} {words.shape}')
  raw = np.ascontiguousarray(words.astype('<i4')).view(np.uint8)              # 4 little-endian bytes per word
  stream = np.unpackbits(raw, axis=-1, bitorder='little')                     # (..., n_words * 32) bits
  planes = stream.reshape(*words.shape[:-1], -1, bits).astype(np.uint16)
  return (planes << np.arange(bits, dtype=np.uint16)).sum(-1).astype(np.uint8)


def qtensor_from_packed(qweight, qzeros, scales, bits: int, group_size: int,
                        packing_format: str = 'auto_round', where: str = 'layer') -> QTensor:
  """One packed Linear (``qweight``, ``qzeros``, ``scales`` as described above) -> an asymmetric ``QTensor`` with codes
  (in, out). ``group_size`` -1 (AutoRound's per-channel) or the input size gives a per-channel spec. ValueError naming
  ``where`` when the shapes do not fit, the packing format is not one of ``PACKING_ZERO_OFFSET``, or ``validate``
  refuses the result (codes or zero points outside [0, 2**bits - 1], scales not finite and > 0)."""
  if packing_format not in PACKING_ZERO_OFFSET:
    raise ValueError(f'{where}: packing_format {packing_format!r}; readable: {sorted(PACKING_ZERO_OFFSET)}')
  qweight, qzeros = np.asarray(qweight), np.asarray(qzeros)
  scales = np.asarray(scales)
  if qweight.ndim != 2 or qweight.shape[0] % bits:
    raise ValueError(f'{where}: qweight must be (in * {bits} / 32, out) with in a multiple of 32, got {qweight.shape}')
  n_in, n_out = qweight.shape[0] * 32 // bits, qweight.shape[1]
  per_channel = group_size in (-1, n_in)
  spec = QuantSpec(bits=bits, granularity='per_channel' if per_channel else 'per_group',
                   group_size=None if per_channel else group_size, symmetric=False, scale_dtype='float16')
  groups = 1 if per_channel else -(-n_in // group_size)
  if scales.shape != (groups, n_out) or qzeros.shape != (groups, n_out * bits // 32):
    raise ValueError(f'{where}: {n_in} x {n_out} at group size {group_size} needs scales {(groups, n_out)} and '
                     f'qzeros {(groups, n_out * bits // 32)}, got {scales.shape} and {qzeros.shape}')
  codes = unpack_bitstream(qweight.T, bits).T                                   # (out, in) streams -> (in, out)
  zeros = unpack_bitstream(qzeros, bits).astype(np.int32) + PACKING_ZERO_OFFSET[packing_format]
  return validate(QTensor(codes=np.ascontiguousarray(codes), scale=scales.astype(np.float32),
                          zero_point=zeros, spec=spec), where)


def read_checkpoint(path: str) -> tuple[dict, dict[str, QTensor]]:
  """(quantization_config, {HF module name, e.g. 'model.layers.0.self_attn.q_proj': QTensor}) of an AutoRound folder
  (config.json + *.safetensors). Only asymmetric integer weights with one bit width and group size (the
  quantization_config's) are read; anything else is a ValueError naming the folder."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  with open(os.path.join(path, 'config.json')) as f:
    qc = json.load(f).get('quantization_config') or {}
  if qc.get('quant_method') != 'auto-round' or qc.get('sym') or qc.get('data_type', 'int') != 'int':
    raise ValueError(f'{path}: not an asymmetric integer AutoRound checkpoint (quantization_config {qc})')
  if qc.get('extra_config'):
    raise ValueError(f'{path}: per-layer overrides (extra_config) are not read: {sorted(qc["extra_config"])[:3]}')
  tensors = {}
  for file in sorted(glob.glob(os.path.join(path, '*.safetensors'))):
    tensors.update(load_file(file))
  modules = sorted(name[:-len('.qweight')] for name in tensors if name.endswith('.qweight'))
  if not modules:
    raise ValueError(f'{path}: no packed layers (*.qweight) in its safetensors files')
  group_size = int(qc['group_size'])
  for m in modules:
    if f'{m}.g_idx' in tensors:
      g_idx = np.asarray(tensors[f'{m}.g_idx'])
      if not np.array_equal(g_idx, np.arange(len(g_idx)) // (len(g_idx) if group_size == -1 else group_size)):
        raise ValueError(f'{path}: {m}.g_idx is not input channel // group_size (act-order is not read)')
  return qc, {m: qtensor_from_packed(tensors[f'{m}.qweight'], tensors[f'{m}.qzeros'], tensors[f'{m}.scales'],
                                     int(qc['bits']), int(qc['group_size']), qc.get('packing_format', 'auto_round'),
                                     f'{path}: {m}') for m in modules}


def decoder_qtensors(by_module: dict[str, QTensor], config) -> dict[str, QTensor]:
  """{HF module name: QTensor} -> {``Decoder(config)`` kernel path, e.g. 'layers_0/attn/q_proj/kernel': QTensor},
  for ``engine.dequantize_params``; ValueError for a module that is not one of the config's projection kernels."""
  names = hf.hf_param_names(config)
  out = {}
  for module, qt in by_module.items():
    path = names.get(f'{module}.weight')
    if path is None or path[-1] != 'kernel':
      raise ValueError(f'{module}: not a projection kernel of this DecoderConfig')
    out['/'.join(path)] = qt
  return out
