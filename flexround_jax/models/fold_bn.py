"""Folding eval-mode BatchNorm into the preceding conv: params of the BN-free form of the same model.

Convention (``_common.ConvBN``): a BatchNorm named ``<conv>_bn`` normalises the output of the conv ``<conv>`` in the
same scope. In eval mode BN(z) = gamma * (z - mean) / sqrt(var + eps) + beta, so with a = gamma / sqrt(var + eps),
per output channel: kernel' = kernel * a (Conv kernel (kh, kw, in_per_group, out): scale the last axis) and
bias' = (bias - mean) * a + beta (bias = 0 for a conv without one).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from flexround_jax.models._common import BN_SUFFIX


def fold_batch_norm(params: dict, batch_stats: dict, epsilon: float = 1e-5) -> dict:
  """{'params', 'batch_stats'} of a ``use_bn=True`` model -> params of its ``use_bn=False`` twin.

  Args:
    params: the BN model's params (nested dict); BN scopes ``<conv>_bn`` hold 'scale' (C,), 'bias' (C,).
    batch_stats: the matching running statistics ('mean' (C,), 'var' (C,)) under the same ``<conv>_bn`` paths.
    epsilon: the BatchNorm epsilon used by the model (``_common.ConvBN``: 1e-5).
  Returns:
    params with every ``<conv>_bn`` removed and ``<conv>`` holding the folded 'kernel' and a 'bias' (C,).
  """
  return _fold(params, batch_stats, epsilon, path=())


def _fold(params: dict, stats: dict, epsilon: float, path: tuple) -> dict:
  out: dict[str, Any] = {}
  for name, sub in params.items():
    if name.endswith(BN_SUFFIX) and name[:-len(BN_SUFFIX)] in params:
      continue
    bn_name = name + BN_SUFFIX
    if bn_name in params:
      if bn_name not in stats:
        raise KeyError(f'batch_stats has no {"/".join(path + (bn_name,))}')
      bn, st = params[bn_name], stats[bn_name]
      a = bn['scale'] / jnp.sqrt(st['var'] + epsilon)
      bias = sub.get('bias', jnp.zeros_like(a))
      out[name] = {'kernel': sub['kernel'] * a, 'bias': (bias - st['mean']) * a + bn['bias']}
    elif isinstance(sub, dict):
      out[name] = _fold(sub, stats.get(name, {}), epsilon, path + (name,))
    else:
      out[name] = sub
  return out
