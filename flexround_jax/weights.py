"""Float params as safetensors files that stream both ways: written one tensor at a time, read back as memory maps.

A model larger than host RAM is quantized from such a file: ``load_params`` returns nested dicts of read-only
``np.memmap`` views (nothing is read yet), and ``flexround_jax.quantize`` reads a leaf only when a jitted step uses
it (jit drops unused arguments before any transfer), i.e. one unit's params at a time plus what the forward to the
first unit needs (the embedding). ``write_params`` takes the tensors from a generator, so a converter
(``models.llama.gguf_to_safetensors``) holds one tensor in memory at a time.

File layout: the standard safetensors format (8-byte little-endian header length, JSON header {name: {'dtype',
'shape', 'data_offsets'}, '__metadata__'}, raw little-endian data), readable by the ``safetensors`` package; leaf
names are the '/'-joined tree paths (``treepath``); the data starts at a multiple of 8 bytes, tensors follow each
other without gaps; byte order is the host's (little-endian on every platform JAX runs on).
"""

from __future__ import annotations

import json
import math
import mmap as mmap_lib
import os
import struct
from typing import Iterable

import jax
import ml_dtypes
import numpy as np

from flexround_jax import treepath

DTYPES = {'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
          'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
          'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8), 'BOOL': np.dtype(np.bool_)}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_ALIGN = 8
_MAX_HEADER = 100 * 2**20   # as the safetensors package: a longer header is a damaged file, not a model


def _code(dtype, name: str) -> str:
  dtype = np.dtype(dtype)
  if dtype not in _CODES:
    raise ValueError(f'tensor {name!r} has dtype {dtype}, which safetensors cannot store '
                     f'(choose one of {sorted(str(d) for d in _CODES)})')
  return _CODES[dtype]


def write_params(path: str, specs: dict[str, tuple[tuple[int, ...], np.dtype]],
                 tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None, *,
                 overwrite: bool = False) -> int:
  """Writes a safetensors file whose tensors arrive one at a time; returns the file's size in bytes.

  Args:
    path: the file; written to ``path + '.partial'`` and renamed when complete, so a crash never leaves a
      truncated file under ``path``.
    specs: {name: (shape, dtype)} of every tensor, in file order (the header is written first).
    tensors: (name, array) pairs in the order of ``specs``, e.g. a generator that converts one tensor per step;
      each must have its spec's shape and dtype.
    metadata: str -> str pairs for the header's ``__metadata__``.
    overwrite: replace an existing file at ``path`` (only once the new one is complete); without it an existing
      path is a FileExistsError before anything is read or written. A folder is never replaced.
  """
  check_writable(path, overwrite)
  header, offset = {}, 0
  for name, (shape, dtype) in specs.items():
    shape = [int(d) for d in shape]
    size = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {'dtype': _code(dtype, name), 'shape': shape, 'data_offsets': [offset, offset + size]}
    offset += size   # no gaps: the safetensors package refuses a file its tensors do not cover exactly
  if metadata:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
      raise ValueError('safetensors metadata must map str to str')
    header['__metadata__'] = dict(metadata)
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-(8 + len(blob)) % _ALIGN)   # data starts 8-byte aligned
  partial = path + '.partial'
  order = list(specs)
  try:
    with open(partial, 'wb') as f:
      f.write(struct.pack('<Q', len(blob)) + blob)
      count = 0
      for name, array in tensors:
        want = order[count] if count < len(order) else None
        if name != want:
          raise ValueError(f'write_params: got tensor {name!r}, expected {want!r} (tensors come in the order of specs)')
        shape, dtype = specs[name]
        array = np.asarray(array)
        if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
          raise ValueError(f'write_params: tensor {name!r} is {array.dtype}{list(array.shape)}, its spec says '
                           f'{np.dtype(dtype)}{list(shape)}')
        f.write(np.ascontiguousarray(array).tobytes())
        count += 1
      if count != len(order):
        raise ValueError(f'write_params: {len(order) - count} tensors of specs never arrived (first: '
                         f'{order[count]!r})')
  except BaseException:
    if os.path.exists(partial):
      os.remove(partial)
    raise
  os.replace(partial, path)
  return 8 + len(blob) + offset


def check_writable(path: str, overwrite: bool) -> None:
  """FileExistsError unless ``path`` is free, or an existing file and ``overwrite`` (a folder is never replaced)."""
  if os.path.isdir(path):
    raise FileExistsError(f'{path} is a folder; give a file path')
  if os.path.lexists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True to replace it')


def save_params(path: str, params, metadata: dict[str, str] | None = None, *, overwrite: bool = False) -> int:
  """Writes a params tree (nested dicts, an nnx pure dict; leaves: numpy, jax or memory-mapped arrays) as a
  safetensors file, one leaf in host memory at a time; returns the file's size. ``load_params`` reads it back.
  An existing ``path`` needs ``overwrite=True``; a key holding '/' is refused (names are '/'-joined paths)."""
  check_writable(path, overwrite)
  flat = treepath.flatten_params(params, f'save_params {path}')
  specs = {name: (np.shape(leaf), np.dtype(leaf.dtype if hasattr(leaf, 'dtype') else np.asarray(leaf).dtype))
           for name, leaf in flat.items()}
  return write_params(path, specs, ((name, np.asarray(leaf)) for name, leaf in flat.items()), metadata,
                      overwrite=overwrite)


def read_header(path: str) -> tuple[dict, dict[str, str], int]:
  """({name: {'dtype', 'shape', 'data_offsets'}}, metadata, data start) of a safetensors file, validated: known
  dtypes, offsets that match the shapes, lie inside the file and do not overlap. ValueError naming the file and
  the tensor otherwise."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'safetensors file not found: {path}')
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f'{path}: too short for a safetensors file ({size} bytes)')
    (n,) = struct.unpack('<Q', head)
    if n > min(_MAX_HEADER, size - 8):
      raise ValueError(f'{path}: header length {n} does not fit the {size}-byte file (truncated or not safetensors)')
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f'{path}: the header is not valid JSON ({e})') from e
  if not isinstance(header, dict):
    raise ValueError(f'{path}: the header is not a JSON object')
  metadata = header.pop('__metadata__', None) or {}
  if not isinstance(metadata, dict):
    raise ValueError(f'{path}: __metadata__ is not a JSON object')
  start, spans = 8 + n, []
  for name, entry in header.items():
    at = f'{path}: tensor {name!r}'
    if not isinstance(entry, dict) or entry.get('dtype') not in DTYPES:
      raise ValueError(f'{at}: unknown or missing dtype in {entry!r} (known: {sorted(DTYPES)})')
    shape, offsets = entry.get('shape'), entry.get('data_offsets')
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
      raise ValueError(f'{at}: shape must be a list of non-negative integers, got {shape!r}')
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets)):
      raise ValueError(f'{at}: data_offsets must be two non-negative integers, got {offsets!r}')
    b, e = offsets
    want = math.prod(shape) * DTYPES[entry['dtype']].itemsize
    if e - b != want:
      raise ValueError(f'{at}: data_offsets span {e - b} bytes, its {entry["dtype"]}{shape} needs {want}')
    if start + e > size:
      raise ValueError(f'{at}: its data ends at byte {start + e}, past the end of the {size}-byte file (truncated?)')
    spans.append((b, e, name))
  spans.sort()
  for (_, e0, a), (b1, _, b) in zip(spans, spans[1:]):
    if b1 < e0:
      raise ValueError(f'{path}: the data of tensors {a!r} and {b!r} overlap')
  return header, metadata, start


def load_params(path: str, mmap: bool = True) -> dict:
  """Nested dicts of the file's tensors (names split at '/'): read-only ``np.memmap`` views (``mmap=True``;
  pages are read from disk when a computation touches them) or arrays read into memory."""
  header, _, start = read_header(path)
  flat = {}
  for name, entry in header.items():
    dtype, shape = DTYPES[entry['dtype']], tuple(entry['shape'])
    b = entry['data_offsets'][0]
    if math.prod(shape) == 0:
      flat[name] = np.zeros(shape, dtype)
    elif mmap:
      flat[name] = np.memmap(path, dtype=dtype, mode='r', offset=start + b, shape=shape)
    else:
      flat[name] = np.fromfile(path, dtype=dtype, count=math.prod(shape), offset=start + b).reshape(shape)
  try:
    return treepath.unflatten(flat)
  except (AttributeError, TypeError) as e:   # 'a/b' and 'a/b/c' both present
    raise ValueError(f'{path}: tensor names overlap as tree paths (one is the prefix of another)') from e


def release_pages(tree) -> None:
  """Drops the pages of the read-only memory-mapped leaves of ``tree`` (``load_params``' maps, and views of them
  such as a transpose) from this process's resident memory (``madvise(MADV_DONTNEED)``). The file's pages stay in
  the page cache, so the next read of a leaf refaults them from memory (from disk once the kernel has evicted them):
  values never change, but what a pass over a model larger than RAM has read stops counting in its RSS. Any other
  leaf (host or device arrays, writable or copy-on-write maps) is left alone; a no-op where madvise is missing."""
  dontneed = getattr(mmap_lib, 'MADV_DONTNEED', None)
  if dontneed is None:
    return
  for leaf in jax.tree.leaves(tree):
    mapped = getattr(leaf, '_mmap', None) if isinstance(leaf, np.memmap) else None
    if mapped is not None and leaf.mode == 'r' and not mapped.closed:
      mapped.madvise(dontneed)


def to_device(params: dict) -> dict:
  """``jax.tree.map(jnp.asarray, params)`` for nested dicts of host arrays, one leaf at a time, each host leaf
  dropped from ``params`` (emptied: pass a tree nothing else needs) as its device copy is made: the peak is the
  params and one leaf, not twice the params (SmolLM2: 0.5 GB less while loading). Same values, same structure."""
  out = {}
  for key in list(params):
    value = params.pop(key)
    out[key] = to_device(value) if isinstance(value, dict) else jax.numpy.asarray(value)
    del value
  return out
