"""SHA-256 digests that make every file we write checkable on load: of arrays (dtype, shape, bytes) and of JSON.

A manifest is {'/'-joined leaf path: {'dtype', 'shape', 'sha256'}} of a tree of arrays (``treepath`` names); it is
stored in the JSON metadata next to the arrays, and the metadata is sealed with the SHA-256 of its canonical JSON,
so that an array or a metadata field that changed after saving is an error on load, never a different model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax
import numpy as np

from flexround_jax import treepath


def json_sha256(obj) -> str:
  """SHA-256 of ``obj`` as canonical JSON (sorted keys, no spaces): equal for equal parsed values."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(',', ':')).encode()).hexdigest()


def array_digest(arr) -> dict:
  """{'dtype': dtype name, 'shape': list, 'sha256': of the C-order bytes} of one array."""
  arr = np.ascontiguousarray(np.asarray(arr))
  return {'dtype': arr.dtype.name, 'shape': list(arr.shape), 'sha256': hashlib.sha256(arr.tobytes()).hexdigest()}


def manifest(tree) -> dict[str, dict]:
  """{'/'-joined leaf path: ``array_digest(leaf)``} of a tree of arrays."""
  return {name: array_digest(leaf) for name, leaf in treepath.flatten(tree).items()}


def dims(value, where: str) -> tuple[int, ...]:
  """A shape read from JSON: a list of non-negative integers, else ValueError naming ``where``."""
  if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
    raise ValueError(f'{where} must be a list of non-negative integers, got {value!r}')
  return tuple(value)


def restore_target(stored: dict, where: str) -> dict:
  """Nested dicts of ``jax.ShapeDtypeStruct`` described by a stored manifest (an Orbax restore target)."""
  if not isinstance(stored, dict):
    raise ValueError(f'{where}: the checksum manifest is missing or not a dict')
  flat = {}
  for name, entry in stored.items():
    at = f'{where}: manifest entry of array {name!r}'
    if not isinstance(entry, dict) or not isinstance(entry.get('dtype'), str):
      raise ValueError(f'{at} is malformed: {entry!r}')
    try:
      dtype = np.dtype(entry['dtype'])
    except TypeError as e:
      raise ValueError(f'{at}: {entry["dtype"]!r} is not a dtype') from e
    flat[name] = jax.ShapeDtypeStruct(dims(entry.get('shape'), f'{at}: shape'), dtype)
  try:
    return treepath.unflatten(flat)
  except (AttributeError, TypeError) as e:   # one name is a prefix path of another
    raise ValueError(f'{where}: the checksum manifest has overlapping array paths') from e


def check(tree, stored: dict, where: str) -> None:
  """ValueError naming ``where`` and the array unless ``tree`` holds exactly the arrays of manifest ``stored``."""
  got = manifest(tree)
  for name in sorted(set(got) | set(stored)):
    if name not in got:
      raise ValueError(f'{where}: array {name!r} of the checksum manifest is missing')
    if name not in stored:
      raise ValueError(f'{where}: array {name!r} is not in the checksum manifest')
    if got[name] != stored[name]:
      raise ValueError(f'{where}: array {name!r} does not match its checksum (stored {stored[name]}, read {got[name]})')


def seal(meta: dict) -> dict:
  """``meta`` plus 'sha256', the digest of its canonical JSON (taken after a JSON round trip, as it is read)."""
  if 'sha256' in meta:
    raise ValueError("metadata to seal already has a 'sha256' field")
  return {**meta, 'sha256': json_sha256(json.loads(json.dumps(meta)))}


def unseal(meta, where: str) -> dict:
  """``meta`` without 'sha256' if the digest matches; else ValueError naming ``where``."""
  if not isinstance(meta, dict) or not isinstance(meta.get('sha256'), str):
    raise ValueError(f'{where}: its metadata has no checksum (damaged, or written by an older flexround_jax)')
  body = {k: v for k, v in meta.items() if k != 'sha256'}
  if json_sha256(body) != meta['sha256']:
    raise ValueError(f'{where}: its metadata does not match its checksum (corrupted)')
  return body


# ------------------------------------------------------------------------ Orbax: item 'state' + sealed item 'meta' ----

def orbax_save_args(state: dict, meta: dict):
  """Composite save args: 'state' (the arrays) and 'meta' (``meta`` + the manifest of ``state``, sealed)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  sealed = seal({**meta, 'arrays': manifest(state)})
  return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(sealed))


def orbax_read_meta(restore, where: str) -> dict:
  """The unsealed item 'meta' (``restore(args)`` restores a Composite); ValueError naming ``where`` if unreadable
  or not matching its seal."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    meta = restore(ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception as e:  # Orbax / tensorstore / json raise assorted errors on damaged files
    raise ValueError(f'{where}: unreadable metadata ({type(e).__name__}: {e})') from e
  return unseal(meta, where)


def orbax_read_state(restore, meta: dict, where: str) -> dict:
  """Item 'state' restored to the manifest ``meta['arrays']`` and checked against it; ValueError naming ``where``
  (and the array) otherwise."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  target = restore_target(meta.get('arrays'), where)
  try:
    state = restore(ocp.args.Composite(state=ocp.args.StandardRestore(target)))['state']
  except Exception as e:  # Orbax / tensorstore raise assorted errors on damaged files
    raise ValueError(f'{where}: unreadable arrays ({type(e).__name__}: {e})') from e
  check(state, meta['arrays'], where)
  return state


def write_in_place(path: str, write) -> None:
  """Calls ``write(tmp)`` on a sibling '<path>.tmp-<pid>' and renames it to ``path`` (an existing ``path`` is moved
  aside first and deleted last), so a crash never leaves a half-written file or folder at ``path``."""
  tmp, old = f'{path}.tmp-{os.getpid()}', f'{path}.old-{os.getpid()}'
  for stale in (tmp, old):
    remove(stale)
  try:
    write(tmp)
  except BaseException:
    remove(tmp)
    raise
  if os.path.lexists(path):
    os.replace(path, old)
  os.replace(tmp, path)
  remove(old)


def remove(path: str) -> None:
  """Deletes a file, link or folder if it exists."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)
