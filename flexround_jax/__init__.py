"""flexround_jax: post-training quantization for JAX/Flax with learned rounding (FlexRound, AdaRound, RTN)."""

from flexround_jax import quantizers
from flexround_jax.qtensor import PackedQTensor, QTensor
from flexround_jax.spec import QuantSpec

__all__ = ['PackedQTensor', 'QTensor', 'QuantSpec', 'quantizers']
__version__ = '0.1.0'
