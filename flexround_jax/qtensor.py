"""QTensor: a quantized kernel as deployed, integer codes plus grid (scale, zero point)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flexround_jax import _layout
from flexround_jax.spec import QuantSpec


def code_dtype(spec: QuantSpec):
  """Smallest integer dtype that holds the codes: int8 (symmetric) or uint8 (asymmetric), as bits <= 8."""
  return np.int8 if spec.symmetric else np.uint8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor:
  """Integer codes of one kernel and the grid that maps them back: ``W_hat = scale * (codes - zero_point)``.

  Attributes:
    codes: kernel-shaped int8 (symmetric, [-2**(b-1), 2**(b-1)-1]) or uint8 (asymmetric, [0, 2**b-1]).
    scale: s1, float32 of grid shape (``()``, ``(1,...,1,out)`` or ``(1,...,1,ceil(in/group),out)``).
    zero_point: int32 of grid shape; 0 for symmetric grids.
    spec: the QuantSpec the codes were made with (static).
    axes: None when the codes' view is the weight reshaped (Dense, DenseGeneral, Conv kernels); else (a weight declared
      with ``WeightParam.in_axes``) the weight's axis order of the view, input axes first: codes (in, out) are
      ``transpose(weight, axes)`` reshaped (static). ``to_weight`` lays them back.
  """

  codes: jax.Array
  scale: jax.Array
  zero_point: jax.Array
  spec: QuantSpec = dataclasses.field(metadata=dict(static=True))
  axes: tuple[int, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """Float kernel; bit-for-bit the training forward (``fake_quant``) of the method that made it."""
    n_in = self.codes.shape[-2]
    zero_point = _layout.expand(jnp.asarray(self.zero_point), self.spec, n_in).astype(jnp.float32)
    q = jnp.asarray(self.codes).astype(jnp.float32) - zero_point
    return (_layout.expand(jnp.asarray(self.scale), self.spec, n_in) * q).astype(dtype)

  def to_weight(self, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """The dequantized weight of ``shape`` (the param's): ``dequantize`` laid out from the view (``axes``)."""
    return _layout.from_view(self.dequantize(dtype), tuple(shape), self.axes)

  def pack(self) -> PackedQTensor:
    """Codes packed into a little-endian bit stream: b bits per code, e.g. two 4-bit codes per byte."""
    codes = np.asarray(self.codes)
    bits = self.spec.bits
    unsigned = codes.astype(np.int16).ravel() & (2 ** bits - 1)
    bit_planes = (unsigned[:, None] >> np.arange(bits)) & 1
    data = np.packbits(bit_planes.astype(np.uint8).ravel(), bitorder='little')
    return PackedQTensor(data=data, shape=tuple(codes.shape), scale=np.asarray(self.scale),
                         zero_point=np.asarray(self.zero_point), spec=self.spec, axes=self.axes)

  @classmethod
  def unpack(cls, packed: PackedQTensor) -> QTensor:
    """Inverse of ``pack``: exactly the original codes."""
    bits = packed.spec.bits
    n = int(np.prod(packed.shape))
    expected = (n * bits + 7) // 8
    if packed.data.dtype != np.uint8 or packed.data.size != expected:
      raise ValueError(f'packed data must be {expected} uint8 bytes for shape {packed.shape} at {bits} bits, '
                       f'got {packed.data.size} of {packed.data.dtype}')
    bit_planes = np.unpackbits(packed.data, count=n * bits, bitorder='little').reshape(n, bits)
    unsigned = (bit_planes.astype(np.int16) << np.arange(bits)).sum(axis=1)
    if packed.spec.symmetric:
      unsigned = np.where(unsigned >= 2 ** (bits - 1), unsigned - 2 ** bits, unsigned)
    codes = unsigned.astype(code_dtype(packed.spec)).reshape(packed.shape)
    return cls(codes=codes, scale=packed.scale, zero_point=packed.zero_point, spec=packed.spec, axes=packed.axes)


@dataclasses.dataclass(frozen=True)
class PackedQTensor:
  """Bit-packed codes (host numpy) plus the grid; ``QTensor.unpack`` restores the QTensor."""

  data: np.ndarray          # uint8, ceil(size * bits / 8) bytes
  shape: tuple[int, ...]
  scale: np.ndarray
  zero_point: np.ndarray
  spec: QuantSpec
  axes: tuple[int, ...] | None = None   # QTensor.axes

  @property
  def nbytes(self) -> int:
    return int(self.data.nbytes + self.scale.nbytes + self.zero_point.nbytes)


def to_tree(qtensors: dict[str, QTensor]) -> tuple[dict, dict]:
  """(arrays, meta) for storing QTensors in a checkpoint: arrays {'k00000': {codes, scale, zero_point}} in sorted
  name order (names may hold any character, so they live in ``meta``), meta {'names', 'specs'} (JSON). Every
  QTensor is ``validate``d first: nothing is written that ``from_tree`` would refuse."""
  names = sorted(qtensors)
  for n in names:
    validate(qtensors[n], f'kernel {n!r}')
  arrays = {f'k{i:05d}': {'codes': np.asarray(qtensors[n].codes),
                          'scale': np.asarray(qtensors[n].scale, np.float32),
                          'zero_point': np.asarray(qtensors[n].zero_point, np.int32)}
            for i, n in enumerate(names)}
  meta = {'names': names, 'specs': [dataclasses.asdict(qtensors[n].spec) for n in names]}
  if any(qtensors[n].axes is not None for n in names):   # only then: the metadata of other runs stays as it was
    meta['axes'] = [None if qtensors[n].axes is None else list(qtensors[n].axes) for n in names]
  return arrays, meta


def from_tree(arrays: dict, meta: dict, where: str) -> dict[str, QTensor]:
  """Inverse of ``to_tree``; every QTensor is ``validate``d. ValueError naming ``where`` and the field if the
  arrays and the metadata do not fit together."""
  names, specs = meta.get('names'), meta.get('specs')
  if (not isinstance(names, list) or not isinstance(specs, list) or len(names) != len(specs)
      or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names)):
    raise ValueError(f"{where}: metadata 'names' / 'specs' must be lists of equal length with distinct names")
  axes = meta.get('axes', [None] * len(names))
  if not isinstance(axes, list) or len(axes) != len(names):
    raise ValueError(f"{where}: metadata 'axes' must be a list as long as 'names'")
  keys = [f'k{i:05d}' for i in range(len(names))]
  if not isinstance(arrays, dict) or set(arrays) != set(keys):
    got = sorted(arrays)[:5] if isinstance(arrays, dict) else type(arrays).__name__
    raise ValueError(f'{where}: QTensor arrays {got} do not match the {len(names)} names in the metadata')
  out = {}
  for key, name, fields, order in zip(keys, names, specs, axes):
    entry, at = arrays[key], f'{where}: kernel {name!r}'
    if not isinstance(entry, dict) or set(entry) != {'codes', 'scale', 'zero_point'}:
      raise ValueError(f'{at}: arrays {key} must be exactly codes, scale and zero_point')
    out[name] = validate(QTensor(codes=np.asarray(entry['codes']), scale=np.asarray(entry['scale']),
                                 zero_point=np.asarray(entry['zero_point']), spec=spec_from_fields(fields, at),
                                 axes=check_axes(order, at)), at)
  return out


def spec_from_fields(fields, where: str) -> QuantSpec:
  """``QuantSpec(**fields)`` from stored JSON; ValueError naming ``where`` if the fields are not a valid spec."""
  try:
    return QuantSpec(**fields)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{where}: invalid QuantSpec fields {fields!r}: {e}') from e


def check_axes(axes, where: str) -> tuple[int, ...] | None:
  """``axes`` (stored JSON: None or a list) as a QTensor's ``axes``; ValueError naming ``where`` unless it is None
  or a permutation of 0..n-1 (n >= 2)."""
  if axes is None:
    return None
  if (not isinstance(axes, (list, tuple)) or len(axes) < 2 or
      sorted(a if isinstance(a, int) and not isinstance(a, bool) else -1 for a in axes) != list(range(len(axes)))):
    raise ValueError(f'{where}: axes must be a permutation of 0..n-1 (n >= 2), got {axes!r}')
  return tuple(axes)


def validate(qt: QTensor, where: str) -> QTensor:
  """``qt`` if its arrays fit its spec, else ValueError naming ``where`` and the field: codes of rank >= 2,
  ``code_dtype(spec)`` and in ``spec.code_range``; scale float32 of grid shape, finite and > 0; zero point int32 of
  grid shape, in [0, 2**bits - 1] (asymmetric) or 0 (symmetric)."""
  spec = qt.spec
  check_axes(qt.axes, where)
  codes, scale, zero_point = np.asarray(qt.codes), np.asarray(qt.scale), np.asarray(qt.zero_point)
  if codes.ndim < 2 or codes.dtype != code_dtype(spec):
    raise ValueError(f'{where}: codes must be {np.dtype(code_dtype(spec)).name} of rank >= 2, got '
                     f'{codes.dtype.name} {codes.shape}')
  lo, hi = spec.code_range
  if codes.size and (codes.min() < lo or codes.max() > hi):
    raise ValueError(f'{where}: codes span [{codes.min()}, {codes.max()}], outside {spec.bits}-bit range [{lo}, {hi}]')
  grid = _layout.grid_shape(codes.shape, spec)
  for field, arr, dtype in (('scale', scale, np.float32), ('zero_point', zero_point, np.int32)):
    if arr.dtype != dtype or arr.shape != grid:
      raise ValueError(f'{where}: {field} must be {np.dtype(dtype).name} of grid shape {grid} ({spec.granularity}), '
                       f'got {arr.dtype.name} {arr.shape}')
  if not np.all(np.isfinite(scale) & (scale > 0)):
    raise ValueError(f'{where}: scale must be finite and > 0, got values in [{scale.min()}, {scale.max()}]')
  zp_lo, zp_hi = (0, 0) if spec.symmetric else (0, 2 ** spec.bits - 1)
  if zero_point.size and (zero_point.min() < zp_lo or zero_point.max() > zp_hi):
    raise ValueError(f'{where}: zero_point spans [{zero_point.min()}, {zero_point.max()}], must be in '
                     f'[{zp_lo}, {zp_hi}] ({"symmetric" if spec.symmetric else "asymmetric"} {spec.bits}-bit)')
  return qt
