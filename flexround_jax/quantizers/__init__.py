"""Weight quantizers, one module per method, each a set of pure functions over one kernel:

  state = method.init(kernel, spec)               # dict of arrays
  k_hat = method.fake_quant(kernel, state, spec)  # differentiable w.r.t. state entries in method.TRAINABLE
  qt    = method.finalize(kernel, state, spec)    # QTensor; qt.dequantize() == fake_quant, bit for bit

and a factory ``method(**knobs) -> base.Method`` that the engine runs (``flexround_jax.methods`` lists them).
Methods: ``rtn`` (round-to-nearest), ``adaround`` (Nagel et al. 2020), ``flexround`` (Lee et al. 2023), ``lrq``
(FlexRound with a low-rank S2, Lee et al. 2024), ``gptq`` (Frantar et al. 2023, closed form), and ``gptq_start``
(a learned method started from the GPTQ solution). ``activation``: activation quantizers (QDrop's LSQ step, dynamic
per-token), the same idea over activation tensors. ``base``: the ``Method`` record (and building a value from a
registry); ``grid``: the uniform integer grid the methods share (rounding, clamps, step sizes, initial grid search).
"""

from flexround_jax.quantizers import activation, adaround, base, flexround, gptq, gptq_start, grid, lrq, rtn

__all__ = ['activation', 'adaround', 'base', 'flexround', 'gptq', 'gptq_start', 'grid', 'lrq', 'rtn']
