"""Named quantization schemes: ``fr.preset('W4G128', iters=500)`` is a ready QuantConfig.

A preset fixes *what* the quantized model is (the weight grid, the activation quantizer or none) and the method that
learns it (FlexRound with its learning rate); the budget (``iters``, ``batch_size``, ``blocks``, ...) stays the
QuantConfig's (or the config file's) and is given as an override. On the command line ``--scheme NAME`` writes a
preset's fields into ``config.quant`` before the ``--config.*`` overrides, so explicit overrides win.

  W4         4-bit per-channel asymmetric weights
  W4G128     4-bit, groups of 128 inputs, asymmetric
  W3G128     3-bit, groups of 128 inputs, asymmetric
  W8A8       8-bit per-channel weights, 8-bit static per-tensor inputs (QDrop's learned step, LSQ)
  W4A8       4-bit per-channel weights, 8-bit dynamic per-token inputs (the LRQ / FlexRound W4A8 evaluation)
  GGUF-Q4_0  the grid llama.cpp's Q4_0 stores: 4-bit symmetric, groups of 32, float16 steps (``export.save_gguf``)

Importing this module does not import JAX; ``preset`` builds the QuantConfig (and imports the engine) when called.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Mapping

from flexround_jax.spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class Preset:
  """One named scheme.

  Attributes:
    name: as listed ('W4G128'); lookups ignore case, '-' and '_'.
    description: one line for listings.
    fields: the QuantConfig fields the preset sets: ``weight`` (a QuantSpec, every field), ``activation``
      ({'name': ..., knobs} or None: weights only) and ``method`` ({'name': ..., knobs}).
  """

  name: str
  description: str
  fields: Mapping[str, Any]

  def __post_init__(self):
    object.__setattr__(self, 'fields', types.MappingProxyType(dict(self.fields)))

  def summary(self) -> dict[str, str]:
    """{'weight': ..., 'activation': ..., 'method': ...} as short text (listings and docs tables)."""
    w = self.fields['weight']
    grid = {'per_channel': 'per-channel', 'per_tensor': 'per-tensor'}.get(w.granularity, f'groups of {w.group_size}')
    weight = f'{w.bits}-bit {grid}, {"symmetric" if w.symmetric else "asymmetric"}, {w.grid_init} init' + \
        ('' if w.scale_dtype == 'float32' else f', {w.scale_dtype} steps')
    act = self.fields['activation']
    activation = 'float' if act is None else \
        f'{act["bits"]}-bit ' + {'lsq': 'static per-tensor (lsq)', 'per_token': 'dynamic per-token'}[act['name']]
    method = ', '.join([self.fields['method']['name']] + [f'{k}={v}' for k, v in self.fields['method'].items()
                                                          if k != 'name'])
    return {'weight': weight, 'activation': activation, 'method': method}


def _preset(name, description, weight, activation=None, lr=3e-3):
  return Preset(name, description, {'weight': weight, 'activation': activation,
                                    'method': {'name': 'flexround', 'lr': lr}})


# FlexRound's official Llama-2 rates: 3e-3 at W4, 2.5e-3 at W3. Grids start from the Lp (p = 2.4) range search.
PRESETS: Mapping[str, Preset] = types.MappingProxyType({p.name: p for p in [
    _preset('W4', '4-bit per-channel weights, float activations',
            QuantSpec(bits=4, granularity='per_channel', grid_init='mse')),
    _preset('W4G128', '4-bit weights in groups of 128 inputs, float activations',
            QuantSpec(bits=4, granularity='per_group', group_size=128, grid_init='mse')),
    _preset('W3G128', '3-bit weights in groups of 128 inputs, float activations',
            QuantSpec(bits=3, granularity='per_group', group_size=128, grid_init='mse'), lr=2.5e-3),
    _preset('W8A8', '8-bit per-channel weights, 8-bit static per-tensor activations (learned step, QDrop/LSQ)',
            QuantSpec(bits=8, granularity='per_channel', grid_init='mse'), activation={'name': 'lsq', 'bits': 8}),
    _preset('W4A8', '4-bit per-channel weights, 8-bit dynamic per-token activations (LRQ / FlexRound W4A8)',
            QuantSpec(bits=4, granularity='per_channel', grid_init='mse'),
            activation={'name': 'per_token', 'bits': 8}),
    _preset('GGUF-Q4_0', "llama.cpp's Q4_0 grid: 4-bit symmetric, groups of 32, float16 steps (export.save_gguf)",
            QuantSpec(bits=4, granularity='per_group', group_size=32, symmetric=True, grid_init='mse',
                      scale_dtype='float16')),
]})


def _key(name: str) -> str:
  return name.upper().replace('-', '').replace('_', '')


def get(name: str) -> Preset:
  """The preset called ``name`` (case, '-' and '_' ignored); ValueError listing the presets otherwise."""
  found = {_key(k): p for k, p in PRESETS.items()}.get(_key(name)) if isinstance(name, str) else None
  if found is None:
    raise ValueError(f'unknown preset {name!r}; presets: {", ".join(PRESETS)}')
  return found


def preset(name: str, **overrides):
  """QuantConfig of preset ``name`` with ``overrides`` (QuantConfig fields, e.g. ``iters=500``,
  ``blocks=r'layers_\\d+'``). A ``weight`` given as a mapping changes only the QuantSpec fields it names
  (``weight={'bits': 3}``); a QuantSpec replaces the preset's. ValueError for an unknown preset or field."""
  from flexround_jax.engine.config import QuantConfig  # pylint: disable=g-import-not-at-top  (imports JAX)
  fields = dict(get(name).fields)
  if isinstance(overrides.get('weight'), Mapping):
    try:
      overrides['weight'] = fields['weight'].replace(**overrides['weight'])
    except TypeError as e:
      raise ValueError(f'QuantConfig.weight: {e}') from e
  fields.update(overrides)
  return QuantConfig.from_dict(fields)


__all__ = ['PRESETS', 'Preset', 'get', 'preset']
