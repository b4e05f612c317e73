"""The base runner config that every ``configs/*.py`` starts from (``base_config()``), derived from QuantConfig's
own defaults so no default is copied by hand; command-line overrides (``apply_overrides``), presets
(``apply_preset``) and the check that turns every config mistake into one ``ConfigError`` naming its path
(``check``)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import typing
from typing import Any, Mapping, Sequence

import ml_collections
from ml_collections import config_dict

from flexround_jax.engine.config import QuantConfig, field_types
from flexround_jax.spec import QuantSpec

RUNNER_FIELDS = frozenset({'checkpoint_dir', 'log_dir'})   # set by the runner from --workdir


def base_config() -> ml_collections.ConfigDict:
  """The config every experiment config starts from: ``quant`` holds every QuantConfig field at its default
  (weight as the QuantSpec fields, method as {'name': ...}), so each is settable from a config file or the command
  line (``--config.quant.iters=100``, ``--config.quant.weight.bits=3``, ``--config.quant.method.name=adaround``).
  A method's knobs are its own: a config file sets those it uses (``quant.method = {'name': 'lrq', 'rank': 64}``);
  ``apply_overrides`` sets any knob of the named method (``--config.quant.method.lr=1e-3``). Fields that the runner
  sets itself (checkpoint_dir, log_dir) are not in it."""
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



class ConfigError(ValueError):
  """A mistake in a runner config (file, preset or command-line override); the message starts with the config path
  ('config.quant.weight.bits: ...'). The CLI prints it as one line."""


# Sections of config.quant that hold a {'name': ..., knobs} mapping for a factory of a registry: their knobs are the
# factory's keyword arguments, so any of them can be set (or overridden) even where the config file does not.
def _sections() -> dict[str, tuple[dict, str]]:
  from flexround_jax import methods  # pylint: disable=g-import-not-at-top
  from flexround_jax.quantizers import activation  # pylint: disable=g-import-not-at-top
  return {'method': (methods.REGISTRY, 'method'), 'activation': (activation.REGISTRY, 'activation quantizer')}


def knobs(factory) -> dict[str, Any]:
  """{knob: default (inspect.Parameter.empty if required)} of a method / activation factory. A ``**NAME_knobs``
  parameter forwards to the knobs of the method NAME (``gptq_flexround(**gptq_knobs)`` takes GPTQ's)."""
  from flexround_jax import methods  # pylint: disable=g-import-not-at-top
  out = {}
  for p in inspect.signature(factory).parameters.values():
    if p.kind == p.VAR_KEYWORD and p.name.endswith('_knobs') and p.name[:-len('_knobs')] in methods.REGISTRY:
      out.update(knobs(methods.REGISTRY[p.name[:-len('_knobs')]]))
    elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
      out[p.name] = p.default
  return out


def parse_value(raw: str) -> Any:
  """A command-line value: a Python literal (3, 1e-3, (20.0, 2.0), {'name': 'lsq'}, None), true / false in any case,
  or else the text itself."""
  if raw.lower() in ('true', 'false'):
    return raw.lower() == 'true'
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return raw


def _as_section(value, where: str) -> dict | None:
  """A method / activation entry as a plain {'name': ..., knobs} dict (a bare name: no knobs), or None."""
  if value is None:
    return None
  if isinstance(value, str):
    return {'name': value}
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping) and isinstance(value.get('name'), str):
    return dict(value)
  raise ConfigError(f"{where}: expected a name or a mapping {{'name': ..., knobs}}, got {value!r}")


def _set_section(config, path: list[str], raw: str) -> None:
  section = path[1]
  where = 'config.quant.' + section
  current = _as_section(config.quant.get(section), where)
  if len(path) == 2:   # the whole entry: a name (its factory's defaults), a mapping, or None (activation: float)
    value = parse_value(raw)
    if value is None and section == 'method':
      raise ConfigError(f'{where}: a method is required')
    config.quant[section] = _as_section(value, where)
    return
  if len(path) > 3:
    raise ConfigError(f'config.{".".join(path)}: {where} takes name=... and its knobs, not nested fields')
  key = path[2]
  if key == 'name':
    # A new name starts from its factory's defaults: knobs the config file gave the old one do not carry over.
    config.quant[section] = {**current, 'name': raw} if current and current['name'] == raw else {'name': raw}
    return
  if current is None:
    raise ConfigError(f'{where}.{key}: set {where}.name first ({", ".join(_sections()[section][0])})')
  value, factory = parse_value(raw), _sections()[section][0].get(current['name'])
  default = knobs(factory).get(key) if factory else None
  if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  config.quant[section] = {**current, key: value}


def _set_field(config, path: list[str], raw: str) -> None:
  where, parent, node = 'config.' + '.'.join(path), 'config', config
  if path[0] == 'quant' and len(path) == 2 and path[1] in RUNNER_FIELDS:
    raise ConfigError(f'{where}: set by the runner from --workdir')
  for i, key in enumerate(path):
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f'{where}: {parent} is {node!r}, not a section with fields')
    if key not in node and not (path[0] == 'task_args' and i == len(path) - 1):   # a task reads the args it knows
      raise ConfigError(f'{where}: no such field; {parent} has {", ".join(sorted(node))}')
    if i < len(path) - 1:
      node, parent = node[key], f'{parent}.{key}'
  value, expected = parse_value(raw), node.get_ref(key).get_type() if key in node else None
  if expected is str and value is not None and not isinstance(value, str):
    value = raw   # a string field keeps the text as typed ('123', a regex)
  elif expected is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  elif expected is bool and not isinstance(value, bool):
    raise ConfigError(f'{where}: expected true or false, got {raw!r}')
  try:
    node[key] = value
  except TypeError:
    raise ConfigError(f'{where}: {raw!r} is not a valid {getattr(expected, "__name__", expected)}') from None


def apply_overrides(config, overrides: Sequence[tuple[str, str]]) -> None:
  """Sets ``overrides`` [('quant.iters', '200'), ('quant.method.lr', '1e-3'), ...] (paths below ``config``, values
  as typed on the command line) in ``config``, in place. Values are parsed by ``parse_value`` and must fit the
  field's type. Every field of the config exists already, except new keys of ``task_args`` (a task reads those it
  knows) and the knobs of ``quant.method`` / ``quant.activation`` (any keyword argument of the named factory).
  Method and activation names are set first, so ``quant.method.name=adaround quant.method.lr=1e-3`` works in any
  order; a new name drops the knobs the config file gave the old one. ConfigError naming the path otherwise."""
  config.unlock()
  sections = _sections()
  parsed = []
  for path, raw in overrides:
    keys = path.split('.')
    if not path or any(not k for k in keys):
      raise ConfigError(f'config.{path}: not a field path')
    parsed.append((keys, raw))
  is_section = lambda keys: len(keys) >= 2 and keys[0] == 'quant' and keys[1] in sections
  names_first = sorted(parsed, key=lambda kr: not (is_section(kr[0]) and (len(kr[0]) == 2 or kr[0][2] == 'name')))
  for keys, raw in names_first:
    if is_section(keys):
      _set_section(config, keys, raw)
    else:
      _set_field(config, keys, raw)


def apply_preset(config, name: str) -> None:
  """Writes preset ``name``'s fields (``presets.PRESETS``: weight, activation, method) into ``config.quant``, in
  place; the other fields (budget, blocks, rules) stay the config file's. ConfigError for an unknown preset."""
  from flexround_jax import presets  # pylint: disable=g-import-not-at-top
  try:
    p = presets.get(name)
  except ValueError as e:
    raise ConfigError(f'--scheme: {e}') from None
  q = config.quant
  q.unlock()
  for key, value in dataclasses.asdict(p.fields['weight']).items():
    q.weight[key] = value
  q.method = dict(p.fields['method'])
  q.activation = None if p.fields['activation'] is None else dict(p.fields['activation'])


def _check_section(config, section: str) -> None:
  registry, kind = _sections()[section]
  where = f'config.quant.{section}'
  entry = _as_section(config.quant.get(section), where)
  if entry is None:
    return
  if entry['name'] not in registry:
    raise ConfigError(f'{where}.name: unknown {kind} {entry["name"]!r}; known: {", ".join(registry)}')
  valid = knobs(registry[entry['name']])
  for key, default in valid.items():
    if default is inspect.Parameter.empty and key not in entry:
      raise ConfigError(f'{where}.{key}: {kind} {entry["name"]!r} needs {key} (--{where}.{key}=...)')
  for key in entry:
    if key != 'name' and key not in valid:
      raise ConfigError(f'{where}.{key}: {kind} {entry["name"]!r} has no knob {key!r}; its knobs: '
                        f'{", ".join(valid) or "none"}')


def _field_path(message: str) -> str:
  """The config path a QuantConfig / QuantSpec / Rule error message names."""
  m = re.match(r'QuantSpec\.(\w+)', message)
  if m:
    return f'config.quant.weight.{m.group(1)}'
  m = re.match(r'QuantConfig\.(\w+)', message)
  if m and m.group(1) in {f.name for f in dataclasses.fields(QuantConfig)}:
    return f'config.quant.{m.group(1)}'
  if message.startswith('Rule '):
    return 'config.quant.rules'
  if message.startswith('WeightParam'):
    return 'config.quant.weight_params'
  return 'config.quant'


def check(config) -> QuantConfig:
  """Validates a runner config before anything is loaded: the task (a registry name or an importable
  'module:function'), the method's and activation quantizer's knobs, and every QuantConfig field. Returns the
  QuantConfig (without the runner's directories); ConfigError naming the config path otherwise."""
  from flexround_jax import tasks  # pylint: disable=g-import-not-at-top
  try:
    tasks.resolve(config.get('task'))
  except ValueError as e:
    raise ConfigError(f'config.task: {e}') from None
  quant = config.get('quant')
  if not isinstance(quant, ml_collections.ConfigDict):
    raise ConfigError(f'config.quant: expected a section of QuantConfig fields, got {quant!r}')
  for section in _sections():
    _check_section(config, section)
  fields = quant.to_dict()
  runner_set = set(fields) & RUNNER_FIELDS
  if runner_set:
    raise ConfigError(f'config.quant.{sorted(runner_set)[0]}: set by the runner from --workdir')
  try:
    return QuantConfig.from_dict(fields)
  except ValueError as e:
    raise ConfigError(f'{_field_path(str(e))}: {e}') from None
  except TypeError as e:   # a value of a type no check expected (e.g. a mapping where a number goes)
    raise ConfigError(f'config.quant: {e}') from None
