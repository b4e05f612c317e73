"""Our own format: packed integer codes + scales + zero points, as safetensors or Orbax.

Every exporter (these two, ``save_gguf``, ``save_compressed_tensors``, the qwix export) takes the params as a linen
dict or an nnx ``State`` (``QuantizeResult.params`` either way; ``treepath.flatten_params`` names their leaves, and
refuses a key holding '/'). ``load_safetensors`` / ``load_orbax`` return ``Loaded(params, qtensors)``, params as
nested dicts, or with ``like=`` (a linen dict or an nnx ``State``, concrete or abstract) in that structure.

safetensors layout (``save_safetensors``), one file, no pickle:
  <kernel path>.qweight     uint8, the codes as a little-endian bit stream, ``bits`` bits per code (4-bit: two per
                            byte, low nibble first; 3-bit: 8 codes in 3 bytes); flattened in the kernel's C order
  <kernel path>.scale       float32, grid shape (() per tensor, (1,...,1,out) per channel, (1,...,1,in/g,out) per group)
  <kernel path>.zero_point  int32, grid shape
  <param path>              every other param (biases, norms, embeddings), unchanged (bfloat16 stays bfloat16)
  <module>.input_step,      with activation quantization: float32 / int32 scalars of each static input quantizer
  <module>.input_zero_point (``QuantizeResult.activations``)
  metadata['flexround_jax']  JSON: format 'flexround_jax/2', kernels {path: {shape (kernel), view (quantized 2-D/conv
                            view), dtype (kernel), every QuantSpec field, and for a weight viewed transposed (a
                            ``WeightParam``'s) axes (``QTensor.axes``)}}, params {path: {dtype, shape}}, and with
                            activation quantization activations {module: quantizer description}
  metadata['sha256']        SHA-256 of the canonical JSON of {the parsed metadata, every tensor's name, dtype, shape
                            and bytes}
A kernel is rebuilt as scale * (codes - zero_point) on its view, cast to its dtype and reshaped to its shape (laid
out by its axes when it has some): bit for bit the fake-quantized kernel the engine trained.

``save_safetensors`` refuses an existing path unless ``overwrite=True``, writes only QTensors that pass
``qtensor.validate``, and renames a complete '<path>.tmp-<pid>' into place (``integrity.write_in_place``). What
``load_safetensors`` verifies, each failure a ValueError naming the file (and the kernel or param, and the field):
  - the checksum, so any changed tensor or metadata field is an error, never a different model;
  - then every field against the tensors: kernel shape and view of equal size (view of rank >= 2), a floating
    kernel dtype, the spec fields a valid QuantSpec, qweight uint8 of ceil(size * bits / 8) bytes, and
    ``qtensor.validate``: scale float32 of the grid shape ``_layout.grid_shape(view, spec)``, finite and > 0, zero
    point int32 of that shape in [0, 2**bits - 1] (0 if symmetric), codes in range; every tensor either a listed
    param of its listed dtype and shape or one part of exactly one listed kernel, every listed part and param there.
  '/1' files (written before the checksum covered the metadata) are still read and checked field by field as above
  (without params list or kernel dtype: kernels decode to float32, as they did); a metadata edit that stays
  consistent with the tensors (group_size 8 -> 9 on 16 inputs) cannot be detected in them. Re-save them as '/2'.

Orbax layout (``save_orbax``): item 'state' {params (dequantized), qtensors (``qtensor.to_tree`` arrays), and with
activation quantization activations (``activation.to_tree`` arrays)}, item 'meta' (JSON: format, names, specs,
activations, 'arrays' = ``integrity.manifest(state)``, sealed by ``integrity.seal``). ``load_activations`` reads the
activation quantizers of either layout back, checked (``activation.check_state``). ``load_orbax``
verifies the metadata seal (so names and specs), restores exactly the arrays of the manifest and checks each one's
dtype, shape and SHA-256, then every QTensor (``qtensor.validate``); any failure, Orbax's own errors included, is a
ValueError naming the export path (and the array). Exports without a seal (format '/1') are refused: re-export.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flexround_jax import _layout
from flexround_jax import integrity
from flexround_jax import qtensor as qtensor_lib
from flexround_jax import treepath
from flexround_jax.qtensor import PackedQTensor, QTensor
from flexround_jax.quantizers import activation as act_lib
from flexround_jax.spec import QuantSpec

FORMAT = 'flexround_jax/2'
FORMAT_1 = 'flexround_jax/1'
_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(QuantSpec))
# Kernel fields every file has ('/1' files lack 'dtype'); a spec field missing from a file takes its QuantSpec default.
_REQUIRED = ('shape', 'view', 'dtype', 'bits', 'granularity', 'group_size', 'symmetric')
_PARTS = ('qweight', 'scale', 'zero_point')
_ACT_PARTS = ('input_step', 'input_zero_point')   # tensors '<module>.<part>' of a static input quantizer


class Loaded(NamedTuple):
  """A model read back by ``load_safetensors`` / ``load_orbax``; unpacks as ``params, qtensors = load_orbax(path)``.

  Attributes:
    params: the params with every quantized kernel dequantized (``QTensor.dequantize`` in the kernel's dtype, reshaped
      to the kernel): nested dicts with str keys and numpy leaves, or, with ``like=``, a tree of ``like``'s structure
      (an nnx ``State`` of ``nnx.Param`` for an nnx ``like``).
    qtensors: {'/'-joined kernel path ('block_0/fc1/kernel'): QTensor}, codes on each kernel's 2-D / conv view.
  """
  params: Any
  qtensors: dict[str, QTensor]


def _flatten(params, where: str = 'params') -> dict[str, np.ndarray]:
  """{'/'-joined name: numpy leaf} of a linen params dict or an nnx State (``treepath.flatten_params``)."""
  return {name: np.asarray(leaf) for name, leaf in treepath.flatten_params(params, where).items()}


def _like(params: dict, like, path: str):
  """``params`` (nested dicts as loaded) in the structure of ``like`` (a linen dict or nnx State, leaves arrays or
  ``jax.ShapeDtypeStruct``); ValueError naming the export and the param unless both hold the same names, shapes and
  dtypes."""
  if like is None:
    return params
  got, want = treepath.flatten(params), treepath.flatten_params(like, f'{path}: like')
  for name in sorted(set(got) | set(want)):
    if name not in want:
      raise ValueError(f'{path}: param {name!r} of the export is not in like=')
    if name not in got:
      raise ValueError(f'{path}: param {name!r} of like= is not in the export')
    g, w = got[name], want[name]
    if (tuple(np.shape(g)), np.dtype(g.dtype)) != (tuple(w.shape), np.dtype(w.dtype)):
      raise ValueError(f'{path}: param {name!r} is {np.dtype(g.dtype).name} {tuple(np.shape(g))} in the export, '
                       f'{np.dtype(w.dtype).name} {tuple(w.shape)} in like=')
  leaves = jax.tree.leaves(like)
  assert len(leaves) == len(want), 'like= has leaves that are not params'
  return jax.tree.unflatten(jax.tree.structure(like), [got[name] for name in want])


def _checksum(tensors: dict[str, np.ndarray], info: dict) -> str:
  digests = {n: integrity.array_digest(t) for n, t in tensors.items()}
  return integrity.json_sha256({'metadata': info, 'tensors': digests})


def _checksum_1(tensors: dict[str, np.ndarray]) -> str:
  """The '/1' checksum: tensors only."""
  h = hashlib.sha256()
  for name in sorted(tensors):
    arr = np.ascontiguousarray(tensors[name])
    h.update(f'{name}|{arr.dtype.str}|{arr.shape}|'.encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def save_safetensors(path: str, params, qtensors: dict[str, QTensor], activations: dict | None = None, *,
                     overwrite: bool = False) -> dict:
  """Writes the quantized model (with ``activations``, ``QuantizeResult.activations``: its input quantizers too);
  returns sizes {'file_bytes', 'float32_bytes'} for reports.

  ``params``: a linen params dict or an nnx ``State`` (``QuantizeResult.params`` either way). Refuses an existing
  ``path`` unless ``overwrite`` (FileExistsError, before any work). Writes a sibling '<path>.tmp-<pid>' and renames it
  into place, so a crash never leaves a half-written file at ``path``.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):   # overwrite=True replaces a file, never deletes a folder
    raise FileExistsError(f'{path} is a folder; save_safetensors writes one file and never replaces a folder')
  if os.path.lexists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True to replace it')
  flat = _flatten(params, f'save_safetensors {path}')
  missing = set(qtensors) - set(flat)
  if missing:
    raise ValueError(f'qtensors name kernels that are not in params: {sorted(missing)[:5]}')
  tensors, kernels, plain = {}, {}, {}
  for name, value in flat.items():
    if name in qtensors:
      qt = qtensor_lib.validate(qtensors[name], f'save_safetensors: kernel {name!r}')
      if qt.codes.size != value.size:
        raise ValueError(f'save_safetensors: kernel {name!r} has {value.size} weights, its QTensor {qt.codes.size}')
      packed = qt.pack()
      tensors[f'{name}.qweight'] = packed.data
      tensors[f'{name}.scale'] = np.asarray(qt.scale, np.float32)
      tensors[f'{name}.zero_point'] = np.asarray(qt.zero_point, np.int32)
      kernels[name] = {'shape': list(value.shape), 'view': list(qt.shape), 'dtype': value.dtype.name,
                       **dataclasses.asdict(qt.spec)}
      if qt.axes is not None:   # only then: files of 'kernel' weights stay as they were
        if len(qt.axes) != value.ndim:
          raise ValueError(f'save_safetensors: kernel {name!r} of shape {value.shape} has QTensor axes {qt.axes}')
        kernels[name]['axes'] = list(qt.axes)
    else:
      tensors[name] = np.ascontiguousarray(value)
      plain[name] = {'dtype': value.dtype.name, 'shape': list(value.shape)}
  info = {'format': FORMAT, 'kernels': kernels, 'params': plain}
  if activations:
    arrays, act_meta = act_lib.to_tree(activations)
    info['activations'] = dict(zip(act_meta['modules'], act_meta['quantizers']))
    for i, module in enumerate(act_meta['modules']):
      for part, key in zip(_ACT_PARTS, ('step', 'zero_point')):
        if f'a{i:05d}' in arrays:
          if f'{module}.{part}' in tensors:
            raise ValueError(f'save_safetensors: tensor name {module}.{part} is taken by a param')
          tensors[f'{module}.{part}'] = np.asarray(arrays[f'a{i:05d}'][key])
  meta = {'flexround_jax': json.dumps(info), 'sha256': _checksum(tensors, json.loads(json.dumps(info)))}
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  integrity.write_in_place(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
  return {'file_bytes': os.path.getsize(path), 'float32_bytes': int(sum(v.size for v in flat.values()) * 4)}


def load_safetensors(path: str, *, like=None) -> Loaded:
  """``Loaded(params, qtensors)`` of a ``save_safetensors`` file; ValueError naming the file if it is damaged or any
  field does not fit the tensors (see the module docstring). ``like``: a linen params dict or an nnx ``State`` (of
  arrays or ``jax.ShapeDtypeStruct``s) to return params in its structure, ValueError naming the param unless it has
  the export's param names, shapes and dtypes. Input quantizers: ``load_activations``."""
  params, qtensors, _ = _load_safetensors(path)
  return Loaded(_like(params, like, path), qtensors)


def load_activations(path: str) -> dict[str, tuple]:
  """{module path: (ActQuantizer, state)} saved with a ``save_safetensors`` file or a ``save_orbax`` folder ({}
  for weight-only exports), verified as the rest of the export; run the model with
  ``activation.quantized_apply(apply_fn, load_activations(path))``."""
  if os.path.isdir(path):
    return _load_orbax(path)[2]
  return _load_safetensors(path)[2]


def _load_safetensors(path: str):
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
  try:
    info = json.loads(meta['flexround_jax'])
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: metadata field 'flexround_jax' is not valid JSON: {e}") from e
  fmt = info.get('format') if isinstance(info, dict) else None
  if fmt not in (FORMAT, FORMAT_1):
    raise ValueError(f'{path} has format {fmt!r}; this version reads {FORMAT!r} and {FORMAT_1!r}')
  if (_checksum(tensors, info) if fmt == FORMAT else _checksum_1(tensors)) != meta['sha256']:
    raise ValueError(f'{path} is corrupted: its SHA-256 checksum does not match its contents')
  acts, tensors = _decode_activations(path, tensors, info)
  return (*_decode(path, tensors, info), acts)


def _decode_activations(path: str, tensors: dict[str, np.ndarray], info: dict):
  """(activation quantizers, the tensors that are not theirs) of a safetensors export."""
  described = info.get('activations', {})
  if not isinstance(described, dict):
    raise ValueError(f"{path}: metadata field 'activations' must be a JSON object")
  modules = sorted(described)
  arrays, rest = {}, dict(tensors)
  for i, module in enumerate(modules):
    names = [f'{module}.{part}' for part in _ACT_PARTS]
    present = [n in rest for n in names]
    if any(present):
      if not all(present):
        raise ValueError(f'{path}: activation quantizer of {module!r} has {names[present.index(True)]} but not '
                         f'{names[present.index(False)]}')
      arrays[f'a{i:05d}'] = {'step': rest.pop(names[0]), 'zero_point': rest.pop(names[1])}
  meta = {'modules': modules, 'quantizers': [described[m] for m in modules]}
  return act_lib.from_tree(arrays, meta, path), rest


def _decode(path: str, tensors: dict[str, np.ndarray], info: dict) -> tuple[dict, dict[str, QTensor]]:
  """Checks every metadata field against the tensors, then rebuilds (params, qtensors)."""
  legacy = info['format'] == FORMAT_1
  kernels, plain = info.get('kernels'), None if legacy else info.get('params')
  if not isinstance(kernels, dict) or not (legacy or isinstance(plain, dict)):
    raise ValueError(f"{path}: metadata fields 'kernels' and 'params' must be JSON objects")
  flat, qtensors, consumed = {}, {}, set()
  for name, entry in kernels.items():
    qt, shape, dtype = _kernel(tensors, name, entry, legacy, f'{path}: kernel {name!r}')
    qtensors[name] = qt
    flat[name] = _layout.from_view(np.asarray(qt.dequantize(dtype)), shape, qt.axes)
    consumed.update(f'{name}.{part}' for part in _PARTS)
  rest = {n: t for n, t in tensors.items() if n not in consumed}
  if legacy:
    stray = sorted(n for n in rest if n.endswith('.qweight'))
    if stray:
      raise ValueError(f'{path}: tensor {stray[0]!r} is not part of any kernel listed in the metadata')
    plain = {n: {'dtype': t.dtype.name, 'shape': list(t.shape)} for n, t in rest.items()}
  for name in sorted(set(rest) | set(plain)):
    if name in kernels or name in consumed:
      raise ValueError(f'{path}: param {name!r} is also a kernel or a kernel part in the metadata')
    if name not in plain:
      raise ValueError(f'{path}: tensor {name!r} is neither a listed param nor part of a listed kernel')
    if name not in rest:
      raise ValueError(f'{path}: param {name!r} listed in the metadata is missing')
    got = {'dtype': rest[name].dtype.name, 'shape': list(rest[name].shape)}
    if plain[name] != got:
      raise ValueError(f'{path}: param {name!r} is {got}, the metadata says {plain[name]}')
    flat[name] = rest[name]
  try:
    return treepath.unflatten(flat), qtensors
  except (AttributeError, TypeError) as e:   # 'a' and 'a/b' both named: no tree holds both
    raise ValueError(f'{path}: tensor names overlap as tree paths ({e})') from e


def _kernel(tensors: dict, name: str, entry, legacy: bool, where: str) -> tuple[QTensor, tuple, np.dtype]:
  """(QTensor, kernel shape, kernel dtype) of one metadata entry, checked field by field against its tensors."""
  known = {'shape', 'view', 'dtype', 'axes', *_SPEC_FIELDS}
  required = set(_REQUIRED) - {'dtype'} if legacy else set(_REQUIRED)
  if not isinstance(entry, dict) or not required <= set(entry) <= known:
    fields = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
    raise ValueError(f'{where}: metadata fields must be {sorted(required)}, got {fields}')
  shape, view = (integrity.dims(entry[f], f'{where}: {f}') for f in ('shape', 'view'))
  if np.prod(shape, dtype=np.int64) != np.prod(view, dtype=np.int64) or len(view) < 2:
    raise ValueError(f'{where}: view {view} must have rank >= 2 and as many elements as shape {shape}')
  axes = qtensor_lib.check_axes(entry.get('axes'), where)
  if axes is not None and (len(axes) != len(shape) or len(view) != 2 or view[0] not in
                           np.cumprod([shape[a] for a in axes]).tolist()):
    raise ValueError(f'{where}: axes {list(axes)} do not lay shape {shape} out as view {view}')
  spec = qtensor_lib.spec_from_fields({f: entry[f] for f in _SPEC_FIELDS if f in entry}, where)
  stored = entry.get('dtype', 'float32')   # '/1' kernels were always decoded to float32
  try:
    dtype = np.dtype(stored) if isinstance(stored, str) else None
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'{where}: dtype {stored!r} is not a floating dtype')
  parts = {}
  for part in _PARTS:
    if f'{name}.{part}' not in tensors:
      raise ValueError(f'{where}: tensor {name}.{part} is missing')
    parts[part] = tensors[f'{name}.{part}']
  n_bytes = (int(np.prod(view)) * spec.bits + 7) // 8
  data = parts['qweight']
  if data.dtype != np.uint8 or data.shape != (n_bytes,):
    raise ValueError(f'{where}: qweight must be {n_bytes} uint8 bytes ({view} at {spec.bits} bits), '
                     f'got {data.dtype.name} {data.shape}')
  packed = PackedQTensor(data=data, shape=view, scale=parts['scale'], zero_point=parts['zero_point'], spec=spec,
                         axes=axes)
  return qtensor_lib.validate(QTensor.unpack(packed), where), shape, dtype


def save_orbax(path: str, result, *, overwrite: bool = False) -> None:
  """The dequantized params and every QTensor (codes, scale, zero point, spec) of ``result`` (a ``QuantizeResult``,
  its params a linen dict or an nnx ``State``) as an Orbax checkpoint.

  Refuses an existing ``path`` unless ``overwrite``. Writes a sibling '<path>.tmp-<pid>' and renames it into place
  (an existing export is moved aside first and deleted last), so a crash never leaves a half-written export at
  ``path``.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  if os.path.lexists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True to replace it')
  flat = _flatten(result.params, f'save_orbax {path}')
  missing = sorted(set(result.qtensors) - set(flat))
  if missing:
    raise ValueError(f'save_orbax {path}: qtensors name kernels that are not in params: {missing[:5]}')
  arrays, qmeta = qtensor_lib.to_tree(result.qtensors)
  state = {'params': treepath.unflatten(flat), 'qtensors': arrays}
  activations = getattr(result, 'activations', None) or {}
  if activations:
    act_arrays, qmeta['activations'] = act_lib.to_tree(activations)
    if act_arrays:
      state['activations'] = act_arrays

  def write(tmp):
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      ckptr.save(tmp, args=integrity.orbax_save_args(state, {'format': FORMAT, **qmeta}))

  integrity.write_in_place(path, write)


def load_orbax(path: str, *, like=None) -> Loaded:
  """``Loaded(params, qtensors)`` of a ``save_orbax`` export, verified (see the module docstring). ``like``: a linen
  params dict or an nnx ``State`` to return params in its structure (as ``load_safetensors``). Input quantizers:
  ``load_activations``."""
  path = os.path.abspath(path)
  params, qtensors, _ = _load_orbax(path)
  return Loaded(_like(params, like, path), qtensors)


def _load_orbax(path: str):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no Orbax export at {path}')
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    restore = lambda args: ckptr.restore(path, args=args)
    meta = integrity.orbax_read_meta(restore, path)
    if meta.get('format') != FORMAT:
      raise ValueError(f'{path} has format {meta.get("format")!r}; this version reads {FORMAT!r}')
    state = integrity.orbax_read_state(restore, meta, path)
  params = jax.tree.map(np.asarray, state.get('params', {}))
  acts = {}
  if 'activations' in meta:
    acts = act_lib.from_tree(state.get('activations', {}), meta['activations'], path)
  elif 'activations' in state:
    raise ValueError(f'{path}: activation arrays without activation metadata')
  return params, qtensor_lib.from_tree(state.get('qtensors', {}), meta, path), acts
