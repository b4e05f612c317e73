"""flexround_jax: post-training quantization for JAX/Flax with learned rounding (FlexRound, AdaRound, RTN).

On a CPU host, importing flexround_jax before jax splits the host into one XLA device per core (single-device XLA
convolutions use one core; the engine shards calibration batches over devices). Set FLEXROUND_JAX_CPU_DEVICES=0
to leave XLA_FLAGS alone, or to a number to choose the count.
"""

import os as _os
import sys as _sys


def _split_cpu_host():
  want = _os.environ.get('FLEXROUND_JAX_CPU_DEVICES')
  flags = _os.environ.get('XLA_FLAGS', '')
  if 'jax' in _sys.modules or 'xla_force_host_platform_device_count' in flags or want == '0':
    return
  count = int(want) if want else (_os.cpu_count() or 1)
  if count > 1:
    _os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={count}'.strip()


_split_cpu_host()

# pylint: disable=g-import-not-at-top,wrong-import-position
from flexround_jax import quantizers
from flexround_jax.engine import QuantConfig, QuantizeResult, dequantize_params, quantize
from flexround_jax.qtensor import PackedQTensor, QTensor
from flexround_jax.spec import QuantSpec

__all__ = ['PackedQTensor', 'QTensor', 'QuantConfig', 'QuantSpec', 'QuantizeResult', 'dequantize_params',
           'quantize', 'quantizers']
__version__ = '0.1.0'
