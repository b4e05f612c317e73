"""Rules about a QTensor's grid that several export formats share, one function per rule.

Each returns what holds and raises nothing: the exporter that asks (``gguf.check_grid``,
``compressed_tensors.check_grid``, ``qwix.to_qwix_params``) names the kernel and the format in its own error. The
grid itself (step, zero point, codes) is ``quantizers.grid``; this module only asks whether a format can store it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from flexround_jax.spec import QuantSpec


def groups_divide(spec: QuantSpec, n_in: int) -> bool:
  """Whether every group of ``spec``'s grid on ``n_in`` inputs holds ``group_size`` inputs (no shorter last group,
  which formats with a fixed block cannot store); True for per-tensor and per-channel grids."""
  return spec.granularity != 'per_group' or n_in % spec.group_size == 0


def scales_exact(scale, dtype) -> np.ndarray:
  """Elementwise (``scale``'s shape): whether each step, as float32, is unchanged by a round trip through ``dtype``
  (a name such as 'float16' / 'bfloat16', or a numpy / ml_dtypes dtype): the format stores that step exactly. A step
  beyond the dtype's range becomes inf there, so it is not exact."""
  scale = np.asarray(scale, np.float32)
  with np.errstate(over='ignore'):
    return scale.astype(jnp.dtype(dtype)).astype(np.float32) == scale
