"""Tasks: a model, its calibration data and its evaluation, ready for the runner.

A task is a function ``make(args: ConfigDict) -> Task``. The registry maps the names used in ``configs/*.py``
(``config.task``) to those functions; each task module imports its heavy dependencies only when made.
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
    'image': 'flexround_jax.tasks.image:make',
}


def make(name: str, args) -> Task:
  if name not in REGISTRY:
    raise ValueError(f'unknown task {name!r}; known tasks: {sorted(REGISTRY)}')
  module, fn = REGISTRY[name].split(':')
  return getattr(importlib.import_module(module), fn)(args)
