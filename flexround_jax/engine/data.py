"""Calibration data in, block activations out: normalising user data, chunked forwards, the activation cache."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Iterable

import jax
import numpy as np


def as_arrays(calib_data) -> Any:
  """A pytree of host numpy arrays sharing the leading (sample) axis, from any accepted calibration input.

  Accepted: an array; a dict (or other pytree) of arrays; a TFDS data source or any sequence of examples
  (``len`` and indexing, each example a dict of arrays); an iterable of batches (arrays or dicts of arrays).
  """
  if calib_data is None:
    raise ValueError('calib_data is None: pass an array, a dict of arrays, an iterable of batches or a data source')
  if hasattr(calib_data, 'shape') and hasattr(calib_data, 'dtype'):
    tree = np.asarray(calib_data)
  elif isinstance(calib_data, dict):
    tree = jax.tree.map(np.asarray, calib_data)
  elif (hasattr(calib_data, '__len__') and hasattr(calib_data, '__getitem__')
        and not isinstance(calib_data, (list, tuple))):
    n = len(calib_data)
    if n == 0:
      raise ValueError('calib_data is empty (a data source with no examples)')
    getitems = getattr(calib_data, '__getitems__', None)
    examples = getitems(list(range(n))) if getitems else [calib_data[i] for i in range(n)]
    tree = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *examples)
  elif isinstance(calib_data, Iterable):
    batches = list(calib_data)
    if not batches:
      raise ValueError('calib_data is empty (the iterable yielded no batches)')
    try:
      tree = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *batches)
    except ValueError as e:
      raise ValueError(f'calib_data batches do not share one structure and trailing shapes: {e}') from e
  else:
    raise ValueError(f'calib_data of type {type(calib_data).__name__} is not supported')
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError('calib_data holds no arrays')
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(f'calib_data arrays must share the leading (sample) axis; got shapes '
                     f'{[np.shape(x) for x in leaves]}')
  if sizes.pop() == 0:
    raise ValueError('calib_data is empty (0 samples)')
  for x in leaves:
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
      raise ValueError('calib_data contains NaN or Inf')
  return tree


def num_samples(tree) -> int:
  return int(np.shape(jax.tree.leaves(tree)[0])[0])


def take(tree, idx):
  return jax.tree.map(lambda x: x[idx], tree)


def chunks(tree, size: int):
  """Yields (start, n_valid, chunk) with every chunk padded to ``size`` rows (repeating the last row)."""
  n = num_samples(tree)
  for start in range(0, n, size):
    stop = min(start + size, n)
    idx = np.arange(start, start + size)
    idx[idx >= stop] = stop - 1
    yield start, stop - start, take(tree, idx)


class ActivationStore:
  """Host storage for one block's inputs or targets: a list of (N, ...) arrays, in RAM or memory-mapped files."""

  def __init__(self, n: int, spill_dir: str | None = None):
    self.n = n
    self.spill_dir = spill_dir
    self.arrays: list[np.ndarray] | None = None
    self._tmp = None

  def _alloc(self, shape, dtype):
    if self.spill_dir is None:
      return np.empty(shape, dtype)
    if self._tmp is None:
      os.makedirs(self.spill_dir, exist_ok=True)
      self._tmp = tempfile.mkdtemp(prefix='acts_', dir=self.spill_dir)
    path = os.path.join(self._tmp, f'{len(self.arrays or [])}.npy')
    return np.lib.format.open_memmap(path, mode='w+', dtype=dtype, shape=shape)

  def write(self, start: int, n_valid: int, leaves: list):
    if self.arrays is None:
      self.arrays = []
      for leaf in leaves:
        self.arrays.append(self._alloc((self.n,) + tuple(np.shape(leaf)[1:]), np.asarray(leaf).dtype))
    for dst, leaf in zip(self.arrays, leaves):
      dst[start:start + n_valid] = np.asarray(leaf)[:n_valid]

  @classmethod
  def from_arrays(cls, arrays: list, spill_dir: str | None = None) -> ActivationStore:
    store = cls(int(np.shape(arrays[0])[0]), spill_dir)
    store.write(0, store.n, arrays)
    return store

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in self.arrays or [])

  def close(self):
    self.arrays = None
    if self._tmp is not None:
      import shutil  # pylint: disable=g-import-not-at-top
      shutil.rmtree(self._tmp, ignore_errors=True)
      self._tmp = None
