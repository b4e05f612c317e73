"""``Method``: a weight-quantization method as a value, the way optax makes an optimizer a value.

A Method is a small frozen record of pure functions over one kernel (Flax layout: Dense (in, out), Conv
(kh, kw, in_per_group, out)) plus the knobs it was made with. The reconstruction engine only ever calls these
functions; it never asks which method it holds:

  state = method.init(kernel, spec)                                   # gradient-trained / rounding methods
  state = method.solve(kernel, spec, hessian)                         # closed-form methods (GPTQ), instead of init
  k_hat = method.fake_quant(kernel, state, spec, step, iters)        # training forward (step: traced int32)
  qt    = method.finalize(kernel, state, spec)                        # QTensor, the deployed kernel
  tx    = method.optimizer(iters)                                     # optax transformation, or None: not trained
  reg   = method.penalty(states, step, iters)                         # added to the block loss, or None
  train = {k: state[k] for k in method.trainable}                     # what the optimizer updates

Factories with their own knobs build Methods (``flexround_jax.methods.flexround(lr=3e-3)``); one file per method,
and no method knows about another. ``from_registry`` builds a Method (or an activation quantizer) from a name or a
config mapping.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

State = dict


@dataclasses.dataclass(frozen=True, eq=False)
class Method:
  """One weight-quantization method (see the module docstring for the calling convention).

  Attributes:
    name: short name for reports and logs ('flexround', 'gptq', ...).
    hparams: the knobs the factory was called with (JSON-serialisable; part of a run's fingerprint).
    init: ``(kernel, spec) -> state`` (dict of arrays). Methods with ``solve`` may leave it None.
    fake_quant: ``(kernel, state, spec, step, iters) -> kernel_hat``, differentiable w.r.t. the ``trainable``
      entries of ``state``. ``step`` is a traced int32 scalar (0-based), ``iters`` a Python int.
    finalize: ``(kernel, state, spec) -> QTensor``; ``finalize(...).dequantize()`` is the deployed kernel.
    trainable: keys of ``state`` that the optimizer updates (empty: nothing is trained).
    optimizer: ``iters -> optax.GradientTransformation`` over the list of per-kernel trainable dicts of a unit,
      or None when the method is not gradient-trained.
    penalty: ``(states, step, iters) -> scalar`` added to the reconstruction loss, ``states`` being the list of
      states of the unit's kernels that use this method (AdaRound's annealed regulariser), or None.
    solve: ``(kernel, spec, hessian) -> state`` for closed-form methods that need the Hessian of the layer-wise
      squared error, ``H = 2/n sum_x x x^T`` over the kernel's (quantized-model) inputs, (in, in) float32; None
      otherwise. When set the engine calls it instead of ``init``; a method may have both ``solve`` and an
      ``optimizer`` (start from a closed-form solution, then train).
    report: ``state -> dict`` of JSON-serialisable facts to add to the unit report (e.g. GPTQ's damping), or None.
  """

  name: str
  hparams: Mapping[str, Any]
  fake_quant: Callable
  finalize: Callable
  init: Callable | None = None
  trainable: tuple[str, ...] = ()
  optimizer: Callable[[int], Any] | None = None
  penalty: Callable | None = None
  solve: Callable | None = None
  report: Callable[[State], dict] | None = None

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f'Method.name must be a non-empty string, got {self.name!r}')
    if self.init is None and self.solve is None:
      raise ValueError(f'Method {self.name!r} needs init or solve')
    if self.trainable and self.optimizer is None:
      raise ValueError(f'Method {self.name!r} has trainable state {self.trainable} but no optimizer')
    object.__setattr__(self, 'hparams', dict(self.hparams))
    object.__setattr__(self, 'trainable', tuple(self.trainable))

  @property
  def trains(self) -> bool:
    """True when the engine runs a gradient loop for this method."""
    return self.optimizer is not None and bool(self.trainable)

  def describe(self) -> dict:
    """{'name': ..., **hparams}: what a report or a fingerprint records of this method."""
    return {'name': self.name, **self.hparams}

  def start(self, kernel, spec, hessian=None) -> State:
    """The starting state: ``solve`` with the Hessian when the method has one, else ``init``."""
    if self.solve is not None:
      if hessian is None:
        raise ValueError(f'method {self.name!r} solves in closed form and needs the input Hessian')
      return self.solve(kernel, spec, hessian)
    return self.init(kernel, spec)

  def split(self, state: State) -> tuple[State, State]:
    """(trainable, frozen) parts of a state."""
    return ({k: v for k, v in state.items() if k in self.trainable},
            {k: v for k, v in state.items() if k not in self.trainable})

  def __repr__(self):
    knobs = ', '.join(f'{k}={v!r}' for k, v in self.hparams.items())
    return f'{self.name}({knobs})'


def ignoring_step(fake_quant: Callable) -> Callable:
  """``fake_quant(kernel, state, spec)`` of a method whose forward does not depend on the step, in the Method
  signature ``(kernel, state, spec, step, iters)``."""
  return lambda kernel, state, spec, step, iters: fake_quant(kernel, state, spec)


def from_registry(value, registry: Mapping, kind: str, value_type: type, knobs: dict):
  """``value`` if it is already a ``value_type`` (no knobs allowed), else built from ``registry``: a registered name
  plus knobs, or a mapping {'name': ..., **knobs} (config files). ValueError naming the ``kind`` otherwise."""
  if isinstance(value, value_type):
    if knobs:
      raise ValueError(f'knobs {sorted(knobs)} given with an already built {kind} {value!r}')
    return value
  if isinstance(value, Mapping):
    value = dict(value)
    if 'name' not in value:
      raise ValueError(f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} given as a mapping needs a 'name' key, got keys "
                       f"{sorted(value)}")
    name = value.pop('name')
    return from_registry(name, registry, kind, value_type, {**value, **knobs})
  if not isinstance(value, str) or value not in registry:
    article = 'an' if value_type.__name__[0] in 'AEIOU' else 'a'
    raise ValueError(f'unknown {kind} {value!r}; known {kind}s: {sorted(registry)} (or pass {article} '
                     f'{value_type.__name__} value)')
  try:
    return registry[value](**knobs)
  except TypeError as e:
    raise ValueError(f'{kind} {value!r} does not take {sorted(knobs)}: {e}') from e
