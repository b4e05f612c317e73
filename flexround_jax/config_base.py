"""The base runner config that every ``configs/*.py`` starts from (``base_config()``), derived from QuantConfig's
own defaults so no default is copied by hand."""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from flexround_jax.engine.config import QuantConfig
from flexround_jax.spec import QuantSpec

RUNNER_FIELDS = frozenset({'checkpoint_dir', 'log_dir'})   # set by the runner from --workdir


def base_config() -> ml_collections.ConfigDict:
  """The config every experiment config starts from: ``quant`` holds every QuantConfig field at its default
  (method as {'name': ..., knobs}, weight as the QuantSpec fields), so each is settable from a config file or the
  command line (``--config.quant.iters=100``, ``--config.quant.method.lr=1e-3``, ``--config.quant.weight.bits=3``).
  Fields that the runner sets itself (checkpoint_dir, log_dir) are not in it."""
  defaults = QuantConfig().describe()
  types = QuantConfig.field_types()
  quant = {}
  for name, value in defaults.items():
    if name in RUNNER_FIELDS:
      continue
    if value is None:
      value = config_dict.placeholder(types[name])
    elif name == 'weight':
      spec_types = {f.name: f.type for f in dataclasses.fields(QuantSpec)}
      value = {k: (config_dict.placeholder(int) if v is None and spec_types[k] == 'int | None' else v)
               for k, v in value.items()}
    quant[name] = value
  quant['method'] = {'name': defaults['method']['name']}   # knobs are the method's own: set those you change
  config = ml_collections.ConfigDict()
  config.task = config_dict.placeholder(str)
  config.task_args = ml_collections.ConfigDict()
  config.eval_fp = True
  config.quant = ml_collections.ConfigDict(quant)
  return config


