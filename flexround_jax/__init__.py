"""flexround_jax: post-training quantization for JAX/Flax with learned rounding (FlexRound, LRQ, AdaRound), GPTQ and
RTN, by block-wise reconstruction.

Importing the package changes no global state and does not import JAX yet: the public names below load on first
use, so a script can call ``flexround_jax.cpu.use_all_cores()`` (one XLA device per CPU core) before JAX starts.
"""

import importlib as _importlib

_PUBLIC = {
    'Method': 'flexround_jax.quantizers.base',
    'PackedQTensor': 'flexround_jax.qtensor',
    'QTensor': 'flexround_jax.qtensor',
    'QuantConfig': 'flexround_jax.engine',
    'QuantSpec': 'flexround_jax.spec',
    'QuantizeResult': 'flexround_jax.engine',
    'Rule': 'flexround_jax.engine',
    'WeightParam': 'flexround_jax.engine',
    'dequantize_params': 'flexround_jax.engine',
    'preset': 'flexround_jax.presets',
    'quantize': 'flexround_jax.engine',
}
_SUBMODULES = ('compile_cache', 'cpu', 'engine', 'export', 'llm', 'methods', 'plots', 'presets', 'quantizers', 'run',
               'tasks', 'weights')

__all__ = sorted(_PUBLIC) + ['cpu', 'methods', 'presets', 'quantizers', 'weights']
__version__ = '0.3.0'


def __getattr__(name):
  if name in _PUBLIC:
    value = getattr(_importlib.import_module(_PUBLIC[name]), name)
  elif name in _SUBMODULES:
    value = _importlib.import_module(f'flexround_jax.{name}')
  else:
    raise AttributeError(f'module flexround_jax has no attribute {name!r}')
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
