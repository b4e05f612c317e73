"""The reconstruction engine: planning units, the activation cache, one unit's reconstruction, the loop, checkpoints.

  config.py       QuantConfig, Rule, WeightParam
  plan.py         units, chains, dry-run plan
  activations.py  calibration arrays, meshes and placement, the activation cache, minibatch sampling
  unit.py         one unit: compiled functions, closed-form solves, the optax loop, RTN fall-back
  loop.py         quantize(), dequantize_params()
  checkpoint.py   per-unit Orbax checkpoints and the run fingerprint
  graph.py        what the engine sees of a Flax model (calls, kernels, stopping a forward at a module)
  precision.py    the training step's matmuls and convolutions in bfloat16 with float32 accumulation
"""

from .config import QuantConfig, Rule, WeightParam
from .loop import QuantizeResult, dequantize_params, quantize
from .plan import Unit, plan_units
from .unit import UnitReconstructor, UnitResult, kernel_views, make_train_step, reconstruct_unit

__all__ = ['QuantConfig', 'QuantizeResult', 'Rule', 'Unit', 'UnitReconstructor', 'UnitResult', 'WeightParam',
           'dequantize_params', 'kernel_views', 'make_train_step', 'plan_units', 'quantize', 'reconstruct_unit']
