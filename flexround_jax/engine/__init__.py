"""The reconstruction engine: blocks, calibration data, the optimisation loop, checkpoints."""

from flexround_jax.engine.config import QuantConfig
from flexround_jax.engine.reconstruct import QuantizeResult, dequantize_params, quantize

__all__ = ['QuantConfig', 'QuantizeResult', 'dequantize_params', 'quantize']
