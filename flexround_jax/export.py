"""Export a quantized model: packed integer codes + scales + zero points, as safetensors or Orbax.

safetensors layout (``save_safetensors``), one file, no pickle:
  <kernel path>.qweight     uint8, the codes as a little-endian bit stream, ``bits`` bits per code (4-bit: two per
                            byte, low nibble first; 3-bit: 8 codes in 3 bytes); flattened in the kernel's C order
  <kernel path>.scale       float32, grid shape (() per tensor, (1,...,1,out) per channel, (1,...,1,in/g,out) per group)
  <kernel path>.zero_point  int32, grid shape
  <param path>              every other param (biases, norms, embeddings), unchanged
  metadata['flexround_jax']  JSON: format version, per kernel {shape (kernel), view (quantized 2-D/conv view),
                            bits, granularity, group_size, symmetric}
  metadata['sha256']        SHA-256 over every tensor's name, dtype, shape and bytes (sorted by name); checked on load
A kernel is rebuilt as scale * (codes - zero_point) on its view, reshaped to its shape: bit for bit the
fake-quantized kernel the engine trained.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np

from flexround_jax import qtensor as qtensor_lib
from flexround_jax import treepath
from flexround_jax.qtensor import PackedQTensor, QTensor
from flexround_jax.spec import QuantSpec

FORMAT = 'flexround_jax/1'


def _flatten(params) -> dict[str, np.ndarray]:
  return {name: np.asarray(leaf) for name, leaf in treepath.flatten(params).items()}


def _checksum(tensors: dict[str, np.ndarray]) -> str:
  h = hashlib.sha256()
  for name in sorted(tensors):
    arr = np.ascontiguousarray(tensors[name])
    h.update(f'{name}|{arr.dtype.str}|{arr.shape}|'.encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def save_safetensors(path: str, params, qtensors: dict[str, QTensor]) -> dict:
  """Writes the quantized model; returns sizes {'file_bytes', 'float32_bytes'} for reports."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  flat = _flatten(params)
  tensors, kernels = {}, {}
  for name, value in flat.items():
    if name in qtensors:
      qt = qtensors[name]
      packed = qt.pack()
      tensors[f'{name}.qweight'] = packed.data
      tensors[f'{name}.scale'] = np.asarray(qt.scale, np.float32)
      tensors[f'{name}.zero_point'] = np.asarray(qt.zero_point, np.int32)
      kernels[name] = {'shape': list(value.shape), 'view': list(qt.shape), 'bits': qt.spec.bits,
                       'granularity': qt.spec.granularity, 'group_size': qt.spec.group_size,
                       'symmetric': qt.spec.symmetric, 'grid_init': qt.spec.grid_init}
    else:
      tensors[name] = np.ascontiguousarray(value)
  missing = set(qtensors) - set(flat)
  if missing:
    raise ValueError(f'qtensors name kernels that are not in params: {sorted(missing)[:5]}')
  meta = {'flexround_jax': json.dumps({'format': FORMAT, 'kernels': kernels}), 'sha256': _checksum(tensors)}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  save_file(tensors, tmp, metadata=meta)
  os.replace(tmp, path)
  return {'file_bytes': os.path.getsize(path), 'float32_bytes': int(sum(v.size for v in flat.values()) * 4)}


def load_safetensors(path: str) -> tuple[dict, dict[str, QTensor]]:
  """(params with dequantized kernels, {kernel path: QTensor}); ValueError naming the file if it is damaged."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f'no export at {path}')
  try:
    with safe_open(path, framework='numpy') as f:
      meta = f.metadata() or {}
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises its own error types for truncated / malformed headers
    raise ValueError(f'{path} is not a readable safetensors file (truncated or corrupted?): {e}') from e
  if 'flexround_jax' not in meta or 'sha256' not in meta:
    raise ValueError(f'{path} is a safetensors file but not a flexround_jax export (no metadata)')
  if _checksum(tensors) != meta['sha256']:
    raise ValueError(f'{path} is corrupted: its SHA-256 checksum does not match its contents')
  info = json.loads(meta['flexround_jax'])
  if info.get('format') != FORMAT:
    raise ValueError(f'{path} has format {info.get("format")!r}; this version reads {FORMAT!r}')
  flat, qtensors = {}, {}
  for name, k in info['kernels'].items():
    spec = QuantSpec(bits=k['bits'], granularity=k['granularity'], group_size=k['group_size'],
                     symmetric=k['symmetric'], grid_init=k.get('grid_init', 'minmax'))
    packed = PackedQTensor(data=tensors.pop(f'{name}.qweight'), shape=tuple(k['view']),
                           scale=tensors.pop(f'{name}.scale'), zero_point=tensors.pop(f'{name}.zero_point'), spec=spec)
    qt = QTensor.unpack(packed)
    qtensors[name] = qt
    flat[name] = np.asarray(qt.dequantize()).reshape(k['shape'])
  flat.update(tensors)
  return treepath.unflatten(flat), qtensors


def save_orbax(path: str, result) -> None:
  """The dequantized params and every QTensor (codes, scale, zero point, spec) as an Orbax checkpoint."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  arrays, meta = qtensor_lib.to_tree(result.qtensors)
  state = {'params': treepath.unflatten(_flatten(result.params)), 'qtensors': arrays}
  meta = {'format': FORMAT, **meta}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(os.path.abspath(path), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               meta=ocp.args.JsonSave(meta)), force=True)


def load_orbax(path: str) -> tuple[dict, dict[str, QTensor]]:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    restored = ckptr.restore(os.path.abspath(path), args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                            meta=ocp.args.JsonRestore()))
  state, meta = restored['state'], restored['meta']
  return jax.tree.map(np.asarray, state['params']), qtensor_lib.from_tree(state['qtensors'], meta)
