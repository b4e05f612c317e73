"""The activation side of the engine: the user's calibration data as host arrays, the data meshes, placing
batches on devices, the per-unit activation cache (RAM or memory-mapped files) and minibatch sampling from it."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


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
  for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jnp.issubdtype(x.dtype, jnp.floating) and not np.isfinite(x).all():   # every float dtype (bfloat16 too)
      where = f' at {jax.tree_util.keystr(kp)}' if kp else ''
      raise ValueError(f'calib_data contains NaN or Inf{where}')
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
  """Host storage for one block's inputs or targets: a list of (N, ...) arrays, in RAM or memory-mapped files.
  ``dtype`` ('bfloat16'; ``QuantConfig.cache_dtype``): floating leaves are stored in it (rounded to nearest);
  ``Placement`` reads them back as float32."""

  def __init__(self, n: int, spill_dir: str | None = None, dtype: str | None = None):
    self.n = n
    self.spill_dir = spill_dir
    self.dtype = None if dtype in (None, 'float32') else jnp.dtype(dtype)
    self.arrays: list[np.ndarray] | None = None
    self._tmp = None

  def _alloc(self, shape, dtype):
    if self.dtype is not None and jnp.issubdtype(dtype, jnp.floating):
      dtype = self.dtype
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
  def from_arrays(cls, arrays: list, spill_dir: str | None = None, dtype: str | None = None) -> ActivationStore:
    store = cls(int(np.shape(arrays[0])[0]), spill_dir, dtype)
    store.write(0, store.n, arrays)
    return store

  @classmethod
  def holding(cls, arrays: list, spill_dir: str | None = None, dtype: str | None = None) -> ActivationStore:
    """A store of ``arrays`` themselves when the cache is in RAM (no copy: the next unit's inputs are the arrays a
    finished unit wrote, already in the cache's dtype), or of copies in new files with ``spill_dir``."""
    if spill_dir is not None:
      return cls.from_arrays(arrays, spill_dir, dtype)
    store = cls(int(np.shape(arrays[0])[0]), dtype=dtype)
    store.arrays = list(arrays)
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


class Sampler:
  """Seeded, stratified minibatch indices into this process's calibration samples.

  The global calibration set is split into ``shards`` equal contiguous parts (each process holds
  shards / process_count of them); every step draws batch_size / shards samples from each part, with a generator
  seeded by (seed, unit, part), so the global minibatch does not depend on how the parts are spread over processes.
  """

  def __init__(self, n_local: int, batch_size: int, sample_shards: int | None, seed: int, unit_index: int):
    shards = self.check(n_local, batch_size, sample_shards)
    local = shards // jax.process_count()
    self.part, self.b = n_local // local, batch_size // shards
    first = jax.process_index() * local
    self.rngs = [np.random.default_rng([seed, unit_index, first + j]) for j in range(local)]
    self.replace = self.b > self.part

  @staticmethod
  def check(n_local: int, batch_size: int, sample_shards: int | None) -> int:
    """The number of parts; raises ValueError naming ``sample_shards`` when the samples or the batch do not split."""
    procs = jax.process_count()
    shards = sample_shards or procs
    if shards % procs or batch_size % shards:
      raise ValueError(f'QuantConfig.sample_shards={shards} must be a multiple of the {procs} processes and divide '
                       f'batch_size={batch_size}')
    local = shards // procs
    if n_local % local:
      raise ValueError(f'the {n_local} calibration samples of this process do not split into {local} equal parts '
                       f'(QuantConfig.sample_shards={shards})')
    return shards

  def __call__(self, step):
    return np.concatenate([j * self.part + np.sort(rng.choice(self.part, self.b, replace=self.replace))
                           for j, rng in enumerate(self.rngs)])


class Placement:
  """The meshes of a run and how host arrays get onto them.

  ``mesh`` spans the devices of every process, shaped (data, model): a training step's global minibatch is split
  over 'data'; the block's params and quantizer state are split over 'model' along their last (output-channel)
  axis (``state``), or replicated when ``model_devices`` is 1. ``local_mesh`` is this process's part (chunked
  forwards over this process's samples). The 'model' axis lies within one process.
  """

  def __init__(self, batch_size: int, num_devices: int | None, model_devices: int = 1):
    devices = jax.devices()
    local = jax.local_devices()
    if model_devices > len(local):
      raise ValueError(f'QuantConfig.model_devices={model_devices} is more than the {len(local)} devices of this '
                       f'process')
    n_local = len(local) if num_devices is None else min(num_devices, len(local))
    n_data = max(1, n_local // model_devices)
    per_proc_batch = batch_size // max(1, jax.process_count())
    while per_proc_batch % n_data:   # the batch must split evenly over the data axis
      n_data -= 1
    n_local = n_data * model_devices
    local = local[:n_local]
    shape = (n_data, model_devices)
    self.local_mesh = jax.sharding.Mesh(np.array(local).reshape(shape), ('data', 'model'))
    if jax.process_count() == 1:
      self.mesh = self.local_mesh
    else:
      by_proc = {}
      for d in devices:
        by_proc.setdefault(d.process_index, []).append(d)
      chosen = [d for p in sorted(by_proc) for d in by_proc[p][:n_local]]
      self.mesh = jax.sharding.Mesh(np.array(chosen).reshape(-1, model_devices), ('data', 'model'))
    self.n_local_devices = n_data   # devices a chunk of samples is split over
    self.model_devices = model_devices

  @classmethod
  def of(cls, config) -> Placement:
    """The placement a QuantConfig asks for."""
    return cls(config.batch_size, config.num_devices, config.model_devices)

  def state(self, tree):
    """A block's params, quantizer state or optimizer state on ``mesh``: an array whose last axis splits evenly
    over the 'model' axis is split along it (a kernel's output channels, and its per-channel and per-group state);
    any other array (norm scales, per-tensor steps, s4, scalars) is replicated."""
    m = self.model_devices

    def put(x):
      shape = np.shape(x)
      split = m > 1 and len(shape) >= 2 and shape[-1] % m == 0
      spec = P(*([None] * (len(shape) - 1) + ['model'])) if split else P()
      return jax.device_put(x, NamedSharding(self.mesh, spec))
    return jax.tree.map(put, tree)

  def bytes_per_device(self, tree) -> int:
    """Bytes of ``tree``'s arrays held by this process's first device."""
    device = self.local_mesh.devices.flat[0]
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array)
               for s in leaf.addressable_shards if s.device == device)

  def chunk_size(self, eval_batch_size: int) -> int:
    """Samples per chunked forward: a multiple of the local devices."""
    n = self.n_local_devices
    return max(n, (eval_batch_size // n) * n)

  def local(self, tree):
    """Host arrays split over this process's devices along axis 0 (bfloat16 cache arrays as float32)."""
    sharding = NamedSharding(self.local_mesh, P('data'))
    return jax.tree.map(lambda x: jax.device_put(widen(x), sharding), tree)

  def replicated(self, tree):
    return jax.device_put(tree, NamedSharding(self.mesh, P()))

  def global_batch(self, arrays: list, axis: int = 0):
    """This process's part of a minibatch -> global arrays split over ``mesh`` along the sample ``axis``."""
    spec = P(*([None] * axis + ['data']))
    arrays = [widen(a) for a in arrays]
    if jax.process_count() == 1:
      sharding = NamedSharding(self.mesh, spec)
      return [jax.device_put(a, sharding) for a in arrays]
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return [multihost_utils.host_local_array_to_global_array(a, self.mesh, spec) for a in arrays]

  def global_replicated(self, array):
    if jax.process_count() == 1:
      return jax.device_put(array, NamedSharding(self.mesh, P()))
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.host_local_array_to_global_array(array, self.mesh, P())

  def map(self, fn, params, inputs, store: ActivationStore, chunk: int) -> ActivationStore:
    """``fn(params, chunk)`` over ``inputs`` in chunks on the local devices; every output leaf into ``store``."""
    for start, n_valid, part in chunks(inputs, chunk):
      out = fn(params, self.local(part))
      store.write(start, n_valid, [np.asarray(o) for o in jax.tree.leaves(out)])
    return store


def widen(x):
  """A bfloat16 host array of the activation cache (``QuantConfig.cache_dtype``) as float32; anything else as it is."""
  return np.asarray(x, np.float32) if getattr(x, 'dtype', None) == jnp.bfloat16 else x


def sum_over_processes(value):
  """Sum over processes of a float (in float64) or a numpy array (in its dtype); the value itself in one process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if isinstance(value, np.ndarray):
    return np.sum(multihost_utils.process_allgather(value), axis=0).astype(value.dtype)
  return float(np.sum(multihost_utils.process_allgather(np.float64(value))))
