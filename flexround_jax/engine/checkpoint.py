"""Crash-safe progress: after every unit an Orbax checkpoint holds the finalized codes of the completed units,
the next unit's cached inputs (when they cannot be recomputed from the model), the report so far, and a
fingerprint of (result-changing config fields, model program, params, calibration data, device and process
counts). A rerun with the same directory resumes at the next unit.

Every step is verified on restore: its JSON metadata must match its seal (``integrity.seal``: SHA-256 of the
canonical JSON, so fingerprint, unit count, names, specs and report are checked), every array must match the
manifest in the metadata (dtype, shape, SHA-256 of the bytes) and every QTensor must fit its spec
(``qtensor.validate``). A damaged newest step (unreadable, mismatched, failing to restore) is reported with
``warnings.warn`` and the previous intact step is used (the run redoes the units after it); with no intact step,
ValueError naming the directory. A fingerprint that differs from this run's is a ValueError, not damage.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

from .. import integrity
from .. import qtensor as qtensor_lib
from ..qtensor import QTensor


def fingerprint(tree, calib, config, model_digest: str, num_devices: int) -> str:
  """SHA-256 of everything that can change the result: the config's result-changing fields (in their order: rules
  are first-match-wins), the model function (``model_digest``), the params, the calibration data, the data-mesh
  size and the process count."""
  h = hashlib.sha256()
  h.update(json.dumps(config.fingerprint_fields(), sort_keys=True, default=str).encode())
  h.update(f'model {model_digest} devices {num_devices} processes {jax.process_count()}'.encode())
  for name, t in (('params', tree), ('calib', calib)):
    h.update(name.encode())
    for kp, leaf in jax.tree_util.tree_flatten_with_path(t)[0]:
      arr = np.ascontiguousarray(np.asarray(leaf))
      h.update(jax.tree_util.keystr(kp).encode() + str(arr.shape).encode() + str(arr.dtype).encode())
      h.update(arr.tobytes())
  return h.hexdigest()


def model_digest(model_fn, tree, probe) -> str:
  """SHA-256 of the model function as a program: its jaxpr on ``probe`` (shapes only) and the values of the
  constants it closes over (batch statistics, masks, tables). A changed ``apply_fn`` (another layer, another
  epsilon, other frozen statistics) gives another digest; the digest is stable across processes for one JAX
  version."""
  closed = jax.make_jaxpr(model_fn)(tree, probe)
  h = hashlib.sha256(re.sub(r' at 0x[0-9a-f]+', '', str(closed.jaxpr)).encode())
  for const in closed.consts:
    arr = np.ascontiguousarray(np.asarray(const))
    h.update(f'{arr.shape}{arr.dtype}'.encode())
    h.update(arr.tobytes())
  return h.hexdigest()


class Checkpointer:
  """Per-unit checkpoints in ``<directory>/units/<completed units>``, the newest two kept."""

  def __init__(self, directory: str, fingerprint: str):
    self.directory = os.path.abspath(directory)
    self.fingerprint = fingerprint
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(os.path.join(self.directory, 'units'), options=options)

  def save(self, completed: int, qtensors: dict[str, QTensor], report: list[dict], acts: dict | None):
    arrays, qmeta = qtensor_lib.to_tree(qtensors)
    state = {'qtensors': arrays}
    if acts is not None:
      state['acts'] = {part: {f'a{i}': np.asarray(a) for i, a in enumerate(arrays)} for part, arrays in acts.items()}
    meta = {'fingerprint': self.fingerprint, 'completed': completed, **qmeta, 'report': report}
    for step in self.manager.all_steps():
      if step >= completed:   # found damaged by ``restore``: the run is redoing it (Orbax skips steps it has)
        self.manager.delete(step)
    self.manager.save(completed, args=integrity.orbax_save_args(state, meta))
    self.manager.wait_until_finished()

  def restore(self, units):
    """(completed, qtensors, report, acts or None) of the newest intact step, or None if there is no step."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None
    for step in steps:
      try:
        return self._restore(step, units)
      except _Damaged as e:
        warnings.warn(f'{e}; trying an older step' if step != steps[-1] else str(e))
    raise ValueError(f'checkpoint_dir {self.directory} has no intact checkpoint (steps {steps} are damaged); '
                     f'delete it to start over')

  def _restore(self, step: int, units):
    where = _step_dir(self.directory, step)
    meta = _read_meta(self.manager, step, where)
    if meta.get('fingerprint') != self.fingerprint:
      raise ValueError(
          f'checkpoint_dir {self.directory} holds a run with a different config, model function, params or '
          f'calibration data (fingerprint {str(meta.get("fingerprint"))[:12]} != {self.fingerprint[:12]}). Use '
          f'another checkpoint_dir, or delete this one to start over.')
    completed = meta.get('completed')
    if not isinstance(completed, int) or completed > len(units):
      raise ValueError(f'checkpoint_dir {self.directory} has {completed} units done, the model has {len(units)}')
    try:
      state = integrity.orbax_read_state(lambda args: self.manager.restore(step, args=args), meta, where)
      qtensors = qtensor_lib.from_tree(state.get('qtensors', {}), meta, where)
      acts = None
      if 'acts' in state:
        acts = {part: [np.asarray(arrays[f'a{i}']) for i in range(len(arrays))]
                for part, arrays in state['acts'].items()}
      if not isinstance(meta.get('report'), list):
        raise ValueError(f"{where}: metadata 'report' is not a list")
    except Exception as e:  # Orbax / tensorstore raise assorted errors on damaged files; ours are ValueErrors
      raise _Damaged.of(step, where, e) from e
    return completed, qtensors, meta['report'], acts

  def close(self):
    self.manager.close()


def _step_dir(directory: str, step: int) -> str:
  return os.path.join(directory, 'units', str(step))


class _Damaged(Exception):
  """A checkpoint step that cannot be trusted (its message says why)."""

  @classmethod
  def of(cls, step: int, where: str, error: Exception) -> _Damaged:
    ours = isinstance(error, ValueError) and str(error).startswith(f'{where}: ')
    why = str(error).removeprefix(f'{where}: ') if ours else f'{type(error).__name__}: {error}'
    return cls(f'checkpoint step {step} at {where} is damaged ({why})')


def _read_meta(manager, step: int, where: str) -> dict:
  """The sealed JSON metadata of one step, unsealed; _Damaged if unreadable or not matching its seal."""
  try:
    return integrity.orbax_read_meta(lambda args: manager.restore(step, args=args), where)
  except ValueError as e:
    raise _Damaged.of(step, where, e) from e


def describe(directory: str) -> dict:
  """The JSON metadata of the newest step in ``directory`` whose metadata matches its seal (arrays not read);
  {} if there is none; a damaged newer step is skipped with a warning, ValueError if every step is damaged."""
  directory = os.path.abspath(directory)
  manager = ocp.CheckpointManager(os.path.join(directory, 'units'))
  try:
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
      try:
        return _read_meta(manager, step, _step_dir(directory, step))
      except _Damaged as e:
        warnings.warn(str(e))
  finally:
    manager.close()
  if steps:
    raise ValueError(f'checkpoint_dir {directory} has no intact checkpoint (steps {steps} are damaged)')
  return {}
