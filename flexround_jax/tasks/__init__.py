"""Tasks: a model, its calibration data and its evaluation, ready for the runner.

A task is a function ``make(args: ConfigDict) -> Task``. ``config.task`` names one: a key of the registry (the tasks
of ``configs/*.py``) or an import path ``'module:function'`` for a task of your own
(``--config.task=my_pkg.tasks:make_task``). Each task module imports its heavy dependencies only when made.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable


@dataclasses.dataclass
class Task:
  """params: the float params to quantize; apply_fn(params, batch); calib: calibration data for ``quantize``;
  evaluate(params, apply_fn=None) -> {metric: value} (``apply_fn``: evaluate this forward instead of the task's own,
  e.g. ``QuantizeResult.apply_quantized(task.apply_fn)`` with quantized activations); blocks: default block regex;
  notes: text for reports."""

  name: str
  params: Any
  apply_fn: Callable
  calib: Any
  evaluate: Callable[[Any], dict]
  blocks: str | None = None
  notes: str = ''


REGISTRY = {
    'toy_mlp': 'flexround_jax.tasks.toy:make',
    'minilm': 'flexround_jax.tasks.minilm:make',
    'smollm2': 'flexround_jax.tasks.smollm2:make',
    'gemma3': 'flexround_jax.tasks.gemma3:make',
    'image': 'flexround_jax.tasks.image:make',
}


def resolve(name: str) -> Callable:
  """The task function ``name`` stands for (a registry key or 'module:function'), imported now; ValueError naming
  the problem otherwise (before any model is loaded)."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"no task: set config.task to one of {sorted(REGISTRY)} or an import path 'module:function'")
  path = REGISTRY.get(name, name)
  module_name, _, fn_name = path.partition(':')
  if not module_name or not fn_name:
    raise ValueError(f"unknown task {name!r}; known tasks: {sorted(REGISTRY)}, or an import path 'module:function'")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f'task {name!r}: cannot import module {module_name!r} ({e})') from e
  fn = module
  for attr in fn_name.split('.'):
    fn = getattr(fn, attr, None)
  if not callable(fn):
    raise ValueError(f'task {name!r}: module {module_name!r} has no function {fn_name!r}')
  return fn


def make(name: str, args) -> Task:
  """The Task that ``name``'s function (``resolve``) makes from ``args`` (config.task_args)."""
  task = resolve(name)(args)
  if not isinstance(task, Task):
    raise ValueError(f'task {name!r} returned {type(task).__name__}, not a flexround_jax.tasks.Task')
  return task
