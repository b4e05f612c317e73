"""Weight-quantization methods as values: ``fr.methods.flexround(lr=3e-3)``, ``fr.methods.gptq(damp=0.01)``, ...

Each factory returns a ``Method`` (``flexround_jax.quantizers.base``) that carries its own optimizer, penalty and
knobs; the engine runs whatever it is given. A name is shorthand for the factory's defaults
(``QuantConfig(method='adaround')``). A new method is one file under ``quantizers/`` plus one line in ``REGISTRY``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flexround_jax.quantizers import adaround as _adaround
from flexround_jax.quantizers import flexround as _flexround
from flexround_jax.quantizers import gptq as _gptq
from flexround_jax.quantizers import lrq as _lrq
from flexround_jax.quantizers import rtn as _rtn
from flexround_jax.quantizers.base import Method, from_registry
from flexround_jax.quantizers.gptq_start import start_from_gptq


def gptq_flexround(lr: float = 3e-3, lr_s1: float | None = None, fused_grad: bool = False,
                   **gptq_knobs) -> Method:
  """FlexRound started from the GPTQ solution of the same layer (``quantizers/gptq_start.py``); ``lr``, ``lr_s1``,
  ``fused_grad``: FlexRound's (``fr.methods.flexround``), the rest GPTQ's (``fr.methods.gptq``)."""
  return start_from_gptq(_flexround.method(lr=lr, lr_s1=lr_s1, fused_grad=fused_grad), **gptq_knobs)


def gptq_lrq(rank: int, lr: float = 3e-3, lr_s1: float | None = None, seed: int = 0, **gptq_knobs) -> Method:
  """LRQ started from the GPTQ solution of the same layer."""
  return start_from_gptq(_lrq.method(rank=rank, lr=lr, lr_s1=lr_s1, seed=seed), **gptq_knobs)


DEFAULT = 'flexround'   # QuantConfig's default method
BASELINE = 'rtn'   # what every unit starts from, is compared with and falls back to (engine.Unit.baseline)

rtn = _rtn.method
adaround = _adaround.method
flexround = _flexround.method
gptq = _gptq.method
lrq = _lrq.method

REGISTRY: dict[str, Callable[..., Method]] = {
    'rtn': rtn,
    'adaround': adaround,
    'flexround': flexround,
    'gptq': gptq,
    'lrq': lrq,
    'gptq_flexround': gptq_flexround,
    'gptq_lrq': gptq_lrq,
}


def get(method: str | Method | Mapping[str, Any], **knobs) -> Method:
  """A Method from a Method (returned as is), a registered name plus knobs, or a mapping {'name': ..., **knobs}
  (the form config files use)."""
  return from_registry(method, REGISTRY, 'method', Method, knobs)


__all__ = ['Method', 'REGISTRY', 'adaround', 'flexround', 'get', 'gptq', 'gptq_flexround', 'gptq_lrq', 'lrq', 'rtn',
           'start_from_gptq']
