"""Crash-safe progress: after every unit an Orbax checkpoint holds the finalized codes of the completed units,
the next unit's cached inputs (when they cannot be recomputed from the model), the report so far, and a
fingerprint of (config, params, calibration data). A rerun with the same directory resumes at the next unit."""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from .. import qtensor as qtensor_lib
from ..qtensor import QTensor


def fingerprint(tree, calib, config) -> str:
  """SHA-256 of the result-changing config fields, the params and the calibration data (and the process count)."""
  h = hashlib.sha256()
  h.update(json.dumps(config.fingerprint_fields(), sort_keys=True, default=str).encode())
  for name, t in (('params', tree), ('calib', calib)):
    h.update(name.encode())
    for kp, leaf in jax.tree_util.tree_flatten_with_path(t)[0]:
      arr = np.ascontiguousarray(np.asarray(leaf))
      h.update(jax.tree_util.keystr(kp).encode() + str(arr.shape).encode() + str(arr.dtype).encode())
      h.update(arr.tobytes())
  h.update(str(jax.process_count()).encode())
  return h.hexdigest()


class Checkpointer:

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
    meta = {
        'fingerprint': self.fingerprint, 'completed': completed, **qmeta, 'report': report,
        'shapes': jax.tree.map(lambda a: [list(a.shape), str(a.dtype)], state),
    }
    self.manager.save(completed, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()

  def restore(self, units):
    step = self.manager.latest_step()
    if step is None:
      return None
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    if meta['fingerprint'] != self.fingerprint:
      raise ValueError(
          f'checkpoint_dir {self.directory} holds a run with a different config, params or calibration data '
          f'(fingerprint {meta["fingerprint"][:12]} != {self.fingerprint[:12]}). Use another checkpoint_dir, or '
          f'delete this one to start over.')
    if meta['completed'] > len(units):
      raise ValueError(f'checkpoint_dir {self.directory} has {meta["completed"]} units done, the model has '
                       f'{len(units)}')
    abstract = jax.tree.map(lambda sd: jax.ShapeDtypeStruct(tuple(sd[0]), np.dtype(sd[1])), meta['shapes'],
                            is_leaf=lambda x: isinstance(x, list) and len(x) == 2 and isinstance(x[1], str))
    state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))['state']
    qtensors = qtensor_lib.from_tree(state['qtensors'], meta)
    acts = None
    if 'acts' in state:
      acts = {part: [np.asarray(arrays[f'a{i}']) for i in range(len(arrays))] for part, arrays in state['acts'].items()}
    return meta['completed'], qtensors, meta['report'], acts

  def close(self):
    self.manager.close()


def describe(directory: str) -> dict:
  """The JSON metadata of the newest checkpoint in ``directory`` (for inspection)."""
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(directory), 'units'))
  step = manager.latest_step()
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'] if step is not None else {}
  manager.close()
  return json.loads(json.dumps(meta))
