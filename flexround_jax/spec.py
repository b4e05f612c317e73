"""QuantSpec: how one weight tensor is quantized (bit-width, granularity, sign, initial grid)."""

from __future__ import annotations

import dataclasses
from typing import Literal

Granularity = Literal['per_tensor', 'per_channel', 'per_group']
GridInit = Literal['minmax', 'mse']
ScaleDtype = Literal['float32', 'float16', 'bfloat16']

GRANULARITIES = ('per_tensor', 'per_channel', 'per_group')
GRID_INITS = ('minmax', 'mse')
SCALE_DTYPES = ('float32', 'float16', 'bfloat16')
MIN_BITS, MAX_BITS = 2, 8


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """Uniform weight-quantization grid for one kernel.

  Attributes:
    bits: bit-width b, 2..8. Codes take 2**b values.
    granularity: one grid for the whole tensor (``per_tensor``), one per output channel (``per_channel``, the last
      axis in Flax layouts), or one per output channel and group of ``group_size`` consecutive input channels
      (``per_group``; groups along the input axis, i.e. axis -2: Dense (in, out), Conv (kh, kw, in, out)).
    group_size: input channels per group; required for ``per_group``. When it does not divide the input axis
      the last group is shorter (e.g. 576 = 4 x 128 + 64).
    symmetric: signed codes in [-2**(b-1), 2**(b-1)-1] with zero point 0; otherwise unsigned codes in [0, 2**b-1]
      with an integer zero point (the official FlexRound setting).
    grid_init: initial grid: ``minmax`` (the range [min(w, 0), max(w, 0)]) or ``mse`` (shrink the range by
      1 - 0.01 i, i = 0..79, keeping the one with the smallest mean |w_q - w|**2.4 per grid, as BRECQ's 'mse').
    scale_dtype: the dtype a deployment format stores the grid step s1 in: 'float32' (default), 'float16' (GGUF
      Q4_0/Q8_0, compressed-tensors) or 'bfloat16'. s1 is rounded to it (round to nearest, at least the dtype's
      smallest positive value) wherever it is used, in ``fake_quant`` (straight-through gradient), ``finalize`` and
      the grid search, so the grid a method learns is the grid that is deployed, bit for bit. The QTensor's
      ``scale`` stays float32, holding values exactly representable in ``scale_dtype``.
    narrow_range: symmetric grids only: codes in [-(2**(b-1)-1), 2**(b-1)-1], the code -2**(b-1) unused, so the
      grid is the same on both sides of zero and the min/max step is max|w| / (2**(b-1)-1). The int8 weight grid of
      llama.cpp's Q8_0 (d = max|w| / 127; its int8 dot products assume |code| <= 127) and of TensorFlow's
      ``narrow_range``.
  """

  bits: int = 4
  granularity: Granularity = 'per_channel'
  group_size: int | None = None
  symmetric: bool = False
  grid_init: GridInit = 'minmax'
  scale_dtype: ScaleDtype = 'float32'
  narrow_range: bool = False

  def __post_init__(self):
    if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
      raise ValueError(f'QuantSpec.bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}')
    if self.granularity not in GRANULARITIES:
      raise ValueError(f'QuantSpec.granularity must be one of {GRANULARITIES}, got {self.granularity!r}')
    if self.granularity == 'per_group':
      if self.group_size is None:
        raise ValueError("QuantSpec.group_size is required when granularity='per_group'")
      if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
        raise ValueError(f'QuantSpec.group_size must be a positive integer, got {self.group_size!r}')
    elif self.group_size is not None:
      raise ValueError(f"QuantSpec.group_size is only used with granularity='per_group' "
                       f'(got group_size={self.group_size} with {self.granularity!r})')
    if self.grid_init not in GRID_INITS:
      raise ValueError(f'QuantSpec.grid_init must be one of {GRID_INITS}, got {self.grid_init!r}')
    if self.scale_dtype not in SCALE_DTYPES:
      raise ValueError(f'QuantSpec.scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}')
    if not isinstance(self.symmetric, bool):
      raise ValueError(f'QuantSpec.symmetric must be a bool, got {self.symmetric!r}')
    if not isinstance(self.narrow_range, bool):
      raise ValueError(f'QuantSpec.narrow_range must be a bool, got {self.narrow_range!r}')
    if self.narrow_range and not self.symmetric:
      raise ValueError('QuantSpec.narrow_range=True needs symmetric=True (it drops the code -2**(bits-1) of a '
                       'symmetric grid)')

  @property
  def n_levels(self) -> int:
    return 2 ** self.bits

  @property
  def code_range(self) -> tuple[int, int]:
    """Stored integer code range: [0, 2**b-1] (asymmetric), [-2**(b-1), 2**(b-1)-1] (symmetric) or
    [-(2**(b-1)-1), 2**(b-1)-1] (symmetric, narrow range)."""
    if self.symmetric:
      return -(2 ** (self.bits - 1)) + int(self.narrow_range), 2 ** (self.bits - 1) - 1
    return 0, 2 ** self.bits - 1

  def replace(self, **changes) -> QuantSpec:
    return dataclasses.replace(self, **changes)
