"""The base runner config that every ``configs/*.py`` starts from (``base_config()``), derived from QuantConfig's
own defaults so no default is copied by hand."""

from __future__ import annotations

import typing

import ml_collections
from ml_collections import config_dict

from flexround_jax.engine.config import QuantConfig, field_types
from flexround_jax.spec import QuantSpec

RUNNER_FIELDS = frozenset({'checkpoint_dir', 'log_dir'})   # set by the runner from --workdir


def base_config() -> ml_collections.ConfigDict:
  """The config every experiment config starts from: ``quant`` holds every QuantConfig field at its default
  (weight as the QuantSpec fields, method as {'name': ...}), so each is settable from a config file or the command
  line (``--config.quant.iters=100``, ``--config.quant.weight.bits=3``, ``--config.quant.method.name=adaround``).
  A method's knobs are its own: a config file sets those it uses (``quant.method = {'name': 'lrq', 'rank': 64}``),
  and only knobs present in the file can be overridden from the command line. Fields that the runner sets itself
  (checkpoint_dir, log_dir) are not in it."""
  defaults = QuantConfig().describe()
  types, spec_types = field_types(QuantConfig), field_types(QuantSpec)
  quant = {}
  for name, value in defaults.items():
    if name in RUNNER_FIELDS:
      continue
    if name == 'method':
      value = {'name': value['name']}
    elif name == 'weight':
      value = {k: config_dict.placeholder(spec_types[k]) if v is None else v for k, v in value.items()}
    elif value is None:   # a field typed Any (activation) takes any value: a config file sets a ConfigDict there
      value = config_dict.placeholder(object if types[name] is typing.Any else types[name])
    quant[name] = value
  config = ml_collections.ConfigDict()
  config.task = config_dict.placeholder(str)
  config.task_args = ml_collections.ConfigDict()
  config.eval_fp = True
  config.quant = ml_collections.ConfigDict(quant)
  return config


