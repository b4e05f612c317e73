"""Weight quantizers, one module per method, each a set of pure functions over one kernel:

  state = method.init(kernel, spec)               # dict of arrays
  k_hat = method.fake_quant(kernel, state, spec)  # differentiable w.r.t. state entries in method.TRAINABLE
  qt    = method.finalize(kernel, state, spec)    # QTensor; qt.dequantize() == fake_quant, bit for bit

Methods: ``rtn`` (round-to-nearest), ``adaround`` (Nagel et al. 2020), ``flexround`` (Lee et al. 2023).
"""

from flexround_jax.quantizers import adaround, flexround, rtn

METHODS = {'rtn': rtn, 'adaround': adaround, 'flexround': flexround}

__all__ = ['METHODS', 'adaround', 'flexround', 'rtn']
