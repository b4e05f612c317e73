"""GGUF export for llama.cpp: a decoder loaded from GGUF (``models.gguf``), written back with its quantized kernels
as Q4_0 / Q8_0.

llama.cpp's Q4_0 and Q8_0 blocks are symmetric grids of 32 consecutive input weights with one float16 step ``d``:
Q4_0 stores ``q = code + 8`` in [0, 15] (x = d * (q - 8)), Q8_0 the int8 code in [-127, 127] (x = d * code; llama.cpp
writes d = max|x| / 127, and its int8 dot products take |code| with sign tricks that overflow at -128). A QTensor with
``QuantSpec(bits=4, granularity='per_group', group_size=32, symmetric=True, scale_dtype='float16')``, or the same
with ``bits=8, narrow_range=True``, is exactly such a grid: its codes and steps are written as they are, so llama.cpp
computes with the weights FlexRound learned, bit for bit (``gguf.quants.dequantize`` of every written tensor equals
``QTensor.dequantize``; checked on write).

The blocks are packed here from our codes: ``gguf.quants.quantize`` chooses its own step (max |x| / -8) and cannot
take a learned one. Everything else comes from the template (the GGUF the model was loaded from): every metadata
key (tokenizer, RoPE, norms) and every tensor that is not a quantized kernel, in its source encoding when the
params still equal the source exactly (norms F32, the embedding as in the source), else as F32.

The file is sealed: metadata key ``flexround_jax.tensors`` holds {tensor name: GGML type, numpy dtype, shape and
SHA-256 of its bytes} and ``flexround_jax.sha256`` the SHA-256 of all other metadata, that manifest included
(``models.gguf.gguf_seal``); ``models.gguf.open_gguf`` checks both on load, so a changed byte is an error, never a
different model. llama.cpp looks metadata up by key and ignores these two.
"""

from __future__ import annotations

import os

import numpy as np

from flexround_jax import _extras, integrity, treepath
from flexround_jax.export import grid
from flexround_jax.qtensor import QTensor

BLOCK = 32


def _quant_types():
  types = _extras.require('gguf', 'llm', 'the GGUF export').GGMLQuantizationType
  return {4: types.Q4_0, 8: types.Q8_0}


def check_grid(name: str, qt: QTensor, n_in: int) -> None:
  """Raises ValueError naming the tensor unless ``qt`` is exactly a Q4_0 / Q8_0 grid."""
  spec = qt.spec
  ok = (spec.bits in (4, 8) and spec.granularity == 'per_group' and spec.group_size == BLOCK and spec.symmetric and
        spec.scale_dtype == 'float16' and (spec.bits == 4 or spec.narrow_range))
  if not ok:
    raise ValueError(
        f'kernel {name}: its grid (bits={spec.bits}, {spec.granularity}, group_size={spec.group_size}, '
        f'symmetric={spec.symmetric}, narrow_range={spec.narrow_range}, scale_dtype={spec.scale_dtype}) cannot be '
        f"stored as GGUF Q4_0 / Q8_0, which need QuantSpec(bits=4, granularity='per_group', group_size={BLOCK}, "
        f"symmetric=True, scale_dtype='float16') / the same with bits=8, narrow_range=True (Q8_0's codes are "
        '[-127, 127])')
  if not grid.groups_divide(spec, n_in):
    raise ValueError(f'kernel {name}: {n_in} inputs are not a multiple of the GGUF block size {BLOCK}')
  codes = np.asarray(qt.codes)
  fmt, lo, hi, why = (('Q4_0', -8, 7, 'its 4-bit codes hold [-8, 7]') if spec.bits == 4 else
                      # llama.cpp's int8 dot products take |code| with sign tricks that overflow at -128.
                      ('Q8_0', -127, 127, 'llama.cpp assumes codes in [-127, 127]'))
  if not np.issubdtype(codes.dtype, np.integer) and not np.array_equal(codes, np.round(codes)):
    raise ValueError(f'kernel {name}: its codes ({codes.dtype}) are not all integers')
  bad = codes[(codes < lo) | (codes > hi)]
  if bad.size:
    raise ValueError(f'kernel {name}: code {bad.flat[0]} cannot be stored in {fmt} ({why}; {bad.size} codes out of '
                     'range)')
  if np.any(np.asarray(qt.zero_point) != 0):
    raise ValueError(f'kernel {name}: non-zero zero points cannot be stored in Q4_0 / Q8_0')
  scale = np.asarray(qt.scale, np.float32)
  if scale.size != n_in // BLOCK * qt.shape[-1]:
    raise ValueError(f'kernel {name}: scale of shape {scale.shape} is not one step per block of {BLOCK} inputs '
                     f'({n_in // BLOCK} x {qt.shape[-1]})')
  exact = grid.scales_exact(scale, 'float16')   # steps beyond float16's range: not exact, refused below
  for wrong, what in [(~np.isfinite(scale), 'not finite'), (np.isfinite(scale) & (scale <= 0), 'not positive'),
                      ((scale > 0) & ~exact, f'not exact in float16 (the step {fmt} stores)')]:
    if np.any(wrong):
      raise ValueError(f'kernel {name}: scale {float(scale[wrong].flat[0])!r} is {what} ({int(wrong.sum())} of '
                       f'{scale.size} scales)')


def pack_blocks(codes: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
  """(rows, n_in) int codes and (rows, n_in / 32) steps -> (rows, n_in / 32 * block bytes) uint8 GGUF blocks."""
  rows, n_in = codes.shape
  blocks = codes.reshape(rows, n_in // BLOCK, BLOCK)
  d = np.asarray(scale, np.float32).astype(np.float16).reshape(rows, n_in // BLOCK, 1).view(np.uint8)
  if bits == 4:
    q = (blocks.astype(np.int16) + 8).astype(np.uint8)
    qs = q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << np.uint8(4))   # byte j: element j low, element j + 16 high
  else:
    qs = blocks.astype(np.int8).view(np.uint8)
  return np.concatenate([d, qs], axis=-1).reshape(rows, -1)


def save_gguf(path: str, params, qtensors: dict[str, QTensor], template_gguf: str, overwrite: bool = False,
              keep_source_types: bool = True) -> dict:
  """Writes ``params`` (a ``Decoder`` loaded from ``template_gguf`` by ``models.gguf.load_gguf``, or the ``Llama``
  of ``models.llama.load_smollm2``: the same params) with ``qtensors`` as Q4_0 / Q8_0.

  Args:
    path: the .gguf file to write (through a temporary name, renamed when complete).
    params: the Flax params of the model (dequantized kernels or not: quantized kernels are written from qtensors).
    qtensors: {kernel path ('layers_0/attn/q_proj/kernel'): QTensor} on Q4_0 / Q8_0 grids (see ``check_grid``).
    template_gguf: the source GGUF: its metadata, tokenizer and non-quantized tensors are copied.
    overwrite: replace an existing ``path`` (only once the new file is complete and reads back as sealed).
    keep_source_types: a tensor not in ``qtensors`` whose param still equals the template's keeps the template's
      encoding (default); False writes every such tensor as F32. ``save_gguf(path, params, {}, template,
      keep_source_types=False)`` of a model loaded from a quantized GGUF is the float32 GGUF of its dequantized
      weights: a source ``llama-quantize`` requantizes every tensor from (it copies a tensor whose type already is
      the target type).

  Returns:
    {'tensors': {gguf name: type written}, 'file_bytes': size, 'sha256': the ``flexround_jax.sha256`` seal}.

  Raises:
    ValueError naming the tensor (grid the format cannot hold; a code outside the format's range; a scale that is
    not finite, not positive or not exact in float16; a shape mismatch; a kernel not in the model) or the file (a
    template that is unreadable or fails its range or seal checks), and FileExistsError, all before anything is
    written: ``path`` is then untouched.
  """
  gguf = _extras.require('gguf', 'llm', 'the GGUF export')
  from gguf.quants import dequantize  # pylint: disable=g-import-not-at-top
  from flexround_jax.models import gguf as gguf_source  # pylint: disable=g-import-not-at-top

  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True to replace it')
  if not os.path.isfile(template_gguf):
    raise FileNotFoundError(f'template GGUF not found: {template_gguf}')
  reader, meta = gguf_source.open_gguf(template_gguf)
  arch = gguf_source.architecture(meta, template_gguf)
  shapes = gguf_source.tensor_shapes(reader)
  config = arch.config(meta, frozenset(shapes), template_gguf)
  names = gguf_source.gguf_layout(shapes, config, template_gguf, meta['general.architecture'])
  flat = treepath.flatten_params(params, f'save_gguf {path}')   # a linen dict or an nnx State
  by_param = {treepath.path_str(p): n for n, p in names.items()}
  unknown = sorted(set(qtensors) - set(by_param))
  if unknown:
    raise ValueError(f'qtensors name {unknown[0]!r}, which is not a tensor of the model in {template_gguf}')
  types = _quant_types()

  def to_gguf_rows(w, param):   # a param as its GGUF tensor: kernels (in, out) -> (out, in) rows, llama's q/k permuted
    return np.ascontiguousarray(arch.from_param(np.asarray(w), param, config))

  # Everything is checked and encoded before the file is opened.
  encoded, written = [], {}
  template_tensors = {t.name: t for t in reader.tensors}
  for name, param in names.items():
    key = treepath.path_str(param)
    if key not in flat:
      raise ValueError(f'params lack {key} (GGUF tensor {name})')
    t = template_tensors[name]
    source = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape([int(s) for s in t.shape[::-1]])
    ours = to_gguf_rows(flat[key], param)
    if ours.shape != source.shape:
      raise ValueError(f'{key} has shape {np.shape(flat[key])}, {template_gguf} holds {name} as {source.shape}')
    if key in qtensors:
      qt = qtensors[key]
      if tuple(qt.shape) != tuple(np.shape(flat[key])):
        raise ValueError(f'QTensor {key} has shape {qt.shape}, the param {np.shape(flat[key])}')
      check_grid(key, qt, qt.shape[0])
      codes = to_gguf_rows(qt.codes, param)
      scale = to_gguf_rows(np.asarray(qt.scale).reshape(-1, qt.shape[1]), param)
      data = pack_blocks(codes, scale, qt.spec.bits)
      expected = to_gguf_rows(np.asarray(qt.dequantize()), param)
      if not np.array_equal(np.asarray(dequantize(data, types[qt.spec.bits]), np.float32).reshape(expected.shape),
                            expected):
        raise AssertionError(f'{key}: GGUF blocks do not dequantize to the QTensor (packing bug)')
      encoded.append((name, data, types[qt.spec.bits]))
    elif keep_source_types and np.array_equal(source, ours):
      encoded.append((name, t.data, t.tensor_type))
    else:
      encoded.append((name, ours.astype(np.float32), None))
    written[name] = (encoded[-1][2] or gguf.GGMLQuantizationType.F32).name

  quant = {types[qt.spec.bits] for qt in qtensors.values()}
  file_type = None   # general.file_type says what most weights are, as llama-quantize sets it
  if len(quant) == 1:
    file_type = int({gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
                     gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}[quant.pop()])

  # The metadata written, as GGUFReader reads it back ({key: (value, type, array element type)}): the template's
  # (less the virtual 'GGUF.*' fields and the template's own seal), general.file_type set, then the seal.
  kv = {}
  for key, field in reader.fields.items():
    if key.startswith(('GGUF.', 'flexround_jax.')) or key == 'general.architecture':
      continue
    sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
    kv[key] = (meta[key], field.types[0], sub_type)
  if file_type is not None:
    kv['general.file_type'] = (file_type, gguf.GGUFValueType.UINT32, None)
  digests = {name: gguf_source.gguf_tensor_digest(qtype or gguf.GGMLQuantizationType.F32, data)
             for name, data, qtype in encoded}
  seal = gguf_source.gguf_seal({'general.architecture': meta['general.architecture'],
                          **{k: v for k, (v, _, _) in kv.items()}}, digests)
  kv.update({k: (v, gguf.GGUFValueType.STRING, None) for k, v in seal.items()})

  def write(tmp):
    writer = gguf.GGUFWriter(tmp, meta['general.architecture'])
    for key, (value, vtype, sub_type) in kv.items():
      if key == 'general.alignment':   # the padding of the tensor data, not only a key
        writer.add_custom_alignment(value)
      else:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for name, data, qtype in encoded:
      writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    try:   # the file reads back as sealed, or it is never renamed to ``path``
      gguf_source.open_gguf(tmp)
    except ValueError as e:
      raise AssertionError(f'{path}: the GGUF written does not read back as written (export bug): {e}') from e

  integrity.write_in_place(path, write)
  return {'tensors': written, 'file_bytes': os.path.getsize(path), 'sha256': seal[gguf_source.GGUF_DIGEST_KEY]}
