"""Names of leaves in parameter trees: one spelling for the engine, export, checkpoints and plots.

A leaf's name is its keys joined by '/': dict keys and attribute names as they are, list / nnx-list indices as
integers ('layers/0/kernel'). Nested dicts are walked and rebuilt without copying the leaves.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx


def key_name(key) -> Any:
  """The raw key of one ``jax.tree_util`` path entry: DictKey.key, GetAttrKey.name or SequenceKey.idx."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def path_names(key_path) -> tuple:
  """Raw keys of a ``jax.tree_util`` key path."""
  return tuple(key_name(k) for k in key_path)


def path_str(path) -> str:
  """'/'-joined path ('encoder/layer_0/query/kernel')."""
  return '/'.join(str(p) for p in path)


def flatten(tree) -> dict[str, Any]:
  """{'/'-joined name: leaf} in tree order."""
  return {path_str(path_names(kp)): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def plain(params):
  """``params`` as nested dicts: an nnx ``State`` as ``nnx.to_pure_dict`` gives it (each Variable its value, nnx-list
  indices int keys), any other tree (a linen params dict) as it is. One spelling of a model's params for every
  exporter, whichever Flax API made them."""
  return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def flatten_params(params, where: str = 'params') -> dict[str, Any]:
  """``flatten(plain(params))``; ValueError naming ``where`` and the key if a key holds '/' (Flax accepts a module
  named 'a/b'), whose leaf the '/'-joined name would split into a path or merge with another leaf's."""
  flat = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(plain(params))[0]:
    names = path_names(kp)
    bad = next((k for k in names if isinstance(k, str) and '/' in k), None)
    if bad is not None:
      raise ValueError(f"{where}: key {bad!r} (of {path_str(names)!r}) holds '/', which separates the levels of "
                       f'exported names; rename the module or param')
    flat[path_str(names)] = leaf
  return flat


def flatten_keys(tree) -> dict[str, tuple]:
  """{'/'-joined name: raw key tuple}, to address the leaf with ``get_subtree`` / ``set_leaf``."""
  return {path_str(path_names(kp)): path_names(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: dict[str, Any]) -> dict:
  """Nested dicts from {'/'-joined name: leaf} (keys become strings)."""
  tree: dict = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def get_subtree(tree, path: tuple):
  for name in path:
    tree = tree[name]
  return tree


def set_leaf(tree, path: tuple, value):
  """Copy of nested dict ``tree`` with the leaf (or subtree) at ``path`` replaced (only the spine is copied)."""
  if not path:
    return value
  new = dict(tree)
  new[path[0]] = set_leaf(tree[path[0]], path[1:], value)
  return new
