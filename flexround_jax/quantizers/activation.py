"""Activation quantizers as values: QDrop's learned per-tensor step (LSQ) and LRQ's dynamic per-token grid.

An ``ActQuantizer`` is a frozen record of pure functions over one activation tensor ``x`` (any shape; the last axis
is the feature axis), the way ``base.Method`` is for a kernel:

  state = q.calibrate(x_calib)        # static quantizers: the initial grid from calibration activations
  x_hat = q.fake_quant(x, state)      # differentiable w.r.t. x (straight-through) and the ``trainable`` entries
  tx    = q.optimizer(iters)          # optax transformation for the trainable entries, or None

``lsq(bits)``: asymmetric per-tensor grid with an integer zero point fixed at calibration and a learned step, as
``wimh966/QDrop`` (``LSQFakeQuantize`` with ``MSEObserver``, the QDrop / "Q + FlexRound" setting of the paper):

  x_hat = (clamp(round_ste(x / s) + zp, 0, 2^b - 1) - zp) * s,   s = grad_scale(step, 1 / sqrt(x.size * (2^b - 1)))

The step starts from an Lp (p = 2.4) search over calibration activations: for two-sided data a 2-D search over the
range (i / 100 of max - min, i = 1..100) and every zero point; for one-sided data (after a ReLU) a 1-D search over
the range. Adam with cosine decay, lr 4e-5 (QDrop's ``scale_lr``). QDrop keeps the step positive by replacing it
with max(|s|, eps) before each forward; ``fake_quant`` computes with that value.

``per_token(bits)``: dynamic asymmetric grid per token (per row over the last axis), no learned state, as the LRQ
repository's W4A8 evaluation (``quantize_activation_per_token_absmax``):

  s = max((max - min) / (2^b - 1), 1e-8),  zp = clamp(round(-min / s), 0, 2^b - 1),
  x_hat = s * clamp(round_ste(x / s), -zp, 2^b - 1 - zp)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flexround_jax.quantizers import grid as grid_lib
from flexround_jax.quantizers.base import from_registry

LP_NORM_P = 2.4          # QDrop MSEObserver's score: mean |x_q - x|^2.4
SEARCH_STEPS = 100       # candidate ranges i / 100 of the full range, i = 1..100
EPS_SCALE = 1e-8         # QDrop ObserverBase.eps (calibration)
EPS_STEP = float(np.finfo(np.float32).eps)   # LSQFakeQuantize.eps (the learned step's lower bound)


@dataclasses.dataclass(frozen=True, eq=False)
class ActQuantizer:
  """One activation quantizer (see the module docstring for the calling convention).

  Attributes:
    name: 'lsq' or 'per_token'.
    bits: bit width of the codes (unsigned, 0 .. 2^bits - 1).
    hparams: the knobs the factory was called with (part of a run's fingerprint).
    fake_quant: ``(x, state) -> x_hat``.
    calibrate: ``(x) -> state`` for static quantizers, None for dynamic ones (state ``{}``).
    trainable: keys of the state the optimizer updates.
    optimizer: ``iters -> optax.GradientTransformation``, or None.
    finalize: ``state -> state`` as deployed (host numpy scalars; LSQ: the step made positive as the forward pass
      makes it, so the stored step is the one the model computes with), or None (state as is).
  """

  name: str
  bits: int
  hparams: Mapping[str, Any]
  fake_quant: Callable
  calibrate: Callable | None = None
  trainable: tuple[str, ...] = ()
  optimizer: Callable[[int], Any] | None = None
  finalize: Callable | None = None

  def __post_init__(self):
    object.__setattr__(self, 'hparams', dict(self.hparams))
    object.__setattr__(self, 'trainable', tuple(self.trainable))

  @property
  def static(self) -> bool:
    """True when the grid comes from calibration (and is stored with the model), False when computed per input."""
    return self.calibrate is not None

  def describe(self) -> dict:
    return {'name': self.name, 'bits': self.bits, **self.hparams}

  def __repr__(self):
    knobs = ', '.join(f'{k}={v!r}' for k, v in self.describe().items() if k != 'name')
    return f'{self.name}({knobs})'


def _check_bits(bits) -> int:
  if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
    raise ValueError(f'activation bits must be an integer in [2, 16], got {bits!r}')
  return bits


def _check_x(x, name='x'):
  if not hasattr(x, 'shape') or not hasattr(x, 'dtype') or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'{name} must be a floating-point array, got {type(x).__name__} {getattr(x, "dtype", "")}')
  if np.size(x) == 0:
    raise ValueError(f'{name} is empty (shape {np.shape(x)})')


def grad_scale(t, factor):
  """``t`` in the forward pass, bit for bit, and gradient multiplied by ``factor`` in the backward pass (LSQ).

  QDrop writes ``(t - t * f).detach() + t * f``, which can be an ulp off ``t`` in the forward pass; adding
  ``a - a = 0`` (exact for finite ``a``) to ``t`` keeps the step the model is deployed with exactly the learned one.
  """
  scaled = t * factor
  return jax.lax.stop_gradient(t) + (scaled - jax.lax.stop_gradient(scaled))


def qparams(x_min, x_max, bits: int):
  """QDrop ``ObserverBase.calculate_qparams`` (asymmetric): the grid spanning [min(x_min, 0), max(x_max, 0)];
  returns (scale float32, zero_point int32)."""
  qmax = 2 ** bits - 1
  lo = jnp.minimum(x_min, 0.0)
  hi = jnp.maximum(x_max, 0.0)
  scale = jnp.maximum((hi - lo) / qmax, EPS_SCALE)
  zero_point = jnp.clip(-jnp.round(lo / scale), 0, qmax)
  return scale.astype(jnp.float32), zero_point.astype(jnp.int32)


def _quant_dequant(x, scale, zero_point, bits: int):
  """QDrop ``fake_quantize_per_tensor_affine`` (forward only)."""
  x_int = jnp.round(grid_lib.divide(x, scale)) + zero_point
  return (jnp.clip(x_int, 0, 2 ** bits - 1) - zero_point) * scale


def _lp_error(x, x_min, x_max, bits):
  scale, zero_point = qparams(x_min, x_max, bits)
  return jnp.mean(jnp.abs(_quant_dequant(x, scale, zero_point.astype(jnp.float32), bits) - x) ** LP_NORM_P)


def _search(x, bits: int):
  """QDrop ``MSEObserver`` on one tensor: (x_min, x_max) of the best candidate range (first minimum in QDrop's
  enumeration order wins ties)."""
  qmax = 2 ** bits - 1
  x_min, x_max = jnp.min(x), jnp.max(x)
  one_sided = (x_min >= 0.0) | (x_max <= 0.0)

  def one_d(_):
    xrange = jnp.maximum(jnp.abs(x_min), x_max)

    def body(i, best):
      thres = xrange / SEARCH_STEPS * i
      new_min = jnp.where(x_min >= 0.0, 0.0, -thres)
      new_max = jnp.where(x_max <= 0.0, 0.0, thres)
      score = _lp_error(x, new_min, new_max, bits)
      better = score < best[2]
      return (jnp.where(better, new_min, best[0]), jnp.where(better, new_max, best[1]), jnp.minimum(score, best[2]))
    return jax.lax.fori_loop(1, SEARCH_STEPS + 1, body, (x_min, x_max, jnp.float32(1e10)))[:2]

  def two_d(_):
    lo, hi = jnp.minimum(x_min, 0.0), jnp.maximum(x_max, 0.0)
    xrange = hi - lo
    zps = jnp.arange(qmax + 1, dtype=jnp.float32)

    def body(i, best):
      tmp_max = xrange / SEARCH_STEPS * i
      delta = tmp_max / qmax
      new_min, new_max = -zps * delta, tmp_max - zps * delta
      scores = jax.lax.map(lambda mm: _lp_error(x, mm[0], mm[1], bits), (new_min, new_max))
      j = jnp.argmin(scores)   # first minimum over the zero points of this range, as QDrop's inner loop
      better = scores[j] < best[2]
      return (jnp.where(better, new_min[j], best[0]), jnp.where(better, new_max[j], best[1]),
              jnp.minimum(scores[j], best[2]))
    return jax.lax.fori_loop(1, SEARCH_STEPS + 1, body, (lo, hi, jnp.float32(1e10)))[:2]

  return jax.lax.cond(one_sided, one_d, two_d, None)


def lsq_calibrate(x, bits: int, search: str = 'mse') -> dict:
  """The initial grid {'step': float32 scalar, 'zero_point': int32 scalar} of ``x`` (calibration activations):
  QDrop's Lp search (``search='mse'``) or the plain min/max range (``'minmax'``)."""
  _check_x(x, 'calibration activations')
  x = jnp.asarray(x, jnp.float32)
  if not bool(jnp.all(jnp.isfinite(x))):
    raise ValueError('calibration activations contain NaN or Inf')
  if search == 'mse':
    x_min, x_max = jax.jit(_search, static_argnums=1)(x, bits)
  elif search == 'minmax':
    x_min, x_max = jnp.min(x), jnp.max(x)
  else:
    raise ValueError(f"search must be 'mse' or 'minmax', got {search!r}")
  scale, zero_point = qparams(x_min, x_max, bits)
  return {'step': scale, 'zero_point': zero_point}


def lsq_fake_quant(x, state, bits: int):
  """QDrop ``fake_quantize_learnable_per_tensor_affine_training`` with ``grad_factor = 1 / sqrt(x.size * qmax)``
  and the step made positive as ``LSQFakeQuantize`` does (max(|s|, eps))."""
  qmax = 2 ** bits - 1
  step = jnp.maximum(jnp.abs(state['step']), EPS_STEP)
  s = grad_scale(step, 1.0 / float(np.sqrt(np.size(x) * qmax)))
  zp = jnp.asarray(state['zero_point']).astype(jnp.float32)
  x32 = x.astype(jnp.float32)
  x_int = grid_lib.round_ste(grid_lib.divide(x32, s)) + zp
  return ((grid_lib.clip_inclusive(x_int, 0.0, float(qmax)) - zp) * s).astype(x.dtype)


def lsq_codes(x, state, bits: int):
  """The integer codes (uint8 for bits <= 8, else uint16) a deployed model computes for ``x``."""
  step = jnp.maximum(jnp.abs(state['step']), EPS_STEP)
  x_int = jnp.round(grid_lib.divide(jnp.asarray(x, jnp.float32), step)) + jnp.asarray(state['zero_point'])
  return jnp.clip(x_int, 0, 2 ** bits - 1).astype(jnp.uint8 if bits <= 8 else jnp.uint16)


def per_token_fake_quant(x, state, bits: int):
  """Dynamic asymmetric per-token grid (LRQ's W4A8 evaluation), straight-through in the backward pass."""
  del state
  qmax = 2 ** bits - 1
  x32 = x.astype(jnp.float32)
  t_max = jax.lax.stop_gradient(jnp.max(x32, axis=-1, keepdims=True))
  t_min = jax.lax.stop_gradient(jnp.min(x32, axis=-1, keepdims=True))
  scale = jnp.maximum((t_max - t_min) / qmax, EPS_SCALE)
  zp = jnp.clip(jnp.round(-t_min / scale), 0, qmax)
  q = grid_lib.clip_inclusive(grid_lib.round_ste(grid_lib.divide(x32, scale)), -zp, qmax - zp)
  return (scale * q).astype(x.dtype)


def lsq(bits: int = 4, lr: float = 4e-5, search: str = 'mse') -> ActQuantizer:
  """QDrop's learned per-tensor activation step (see the module docstring). ``lr``: Adam rate with cosine decay
  (QDrop's ``scale_lr``, 4e-5); ``search``: 'mse' (QDrop's MSEObserver) or 'minmax'."""
  bits = _check_bits(bits)
  grid_lib.check_rate(lr, 'lsq lr')
  if search not in ('mse', 'minmax'):
    raise ValueError(f"lsq search must be 'mse' or 'minmax', got {search!r}")
  return ActQuantizer(
      name='lsq', bits=bits, hparams={'lr': lr, 'search': search},
      calibrate=lambda x: lsq_calibrate(x, bits, search),
      fake_quant=lambda x, state: lsq_fake_quant(x, state, bits),
      trainable=('step',),
      optimizer=lambda iters: optax.adam(optax.cosine_decay_schedule(lr, iters, alpha=0.0)),
      finalize=lsq_finalize)


def lsq_finalize(state) -> dict:
  """The state as deployed: step max(|s|, eps) in float32 (what ``lsq_fake_quant`` computes with, so outputs are
  unchanged bit for bit), zero point int32."""
  step = np.float32(max(abs(float(np.asarray(state['step'], np.float32))), EPS_STEP))
  return {'step': step, 'zero_point': np.int32(np.asarray(state['zero_point']))}


def per_token(bits: int = 8) -> ActQuantizer:
  """Dynamic per-token asymmetric activations (LLMs; no learned parameters)."""
  bits = _check_bits(bits)
  return ActQuantizer(name='per_token', bits=bits, hparams={},
                      fake_quant=lambda x, state: per_token_fake_quant(x, state, bits))


REGISTRY: dict[str, Callable[..., ActQuantizer]] = {'lsq': lsq, 'per_token': per_token}
FLOAT = 'float'   # in a Rule: these kernels' inputs stay float


def get(quantizer, **knobs) -> ActQuantizer | None:
  """An ActQuantizer from an ActQuantizer (as is), None (no activation quantization), a registered name plus knobs,
  or a mapping {'name': ..., **knobs} (config files)."""
  if quantizer is None and not knobs:
    return None
  return from_registry(quantizer, REGISTRY, 'activation quantizer', ActQuantizer, knobs)


def state_to_json(state: Mapping) -> dict:
  """A static quantizer's state as exact JSON numbers (float32 -> the Python float of the same value)."""
  out = {}
  for k, v in state.items():
    a = np.asarray(v)
    out[k] = int(a) if jnp.issubdtype(a.dtype, jnp.integer) else float(a)
  return out


def state_from_json(state: Mapping) -> dict:
  """Inverse of ``state_to_json``: {'step': float32, 'zero_point': int32}-style arrays."""
  return {k: np.int32(v) if isinstance(v, int) else np.float32(v) for k, v in state.items()}


def quantized_apply(apply_fn: Callable, activations: Mapping[str, tuple[ActQuantizer, Mapping]]) -> Callable:
  """``apply_fn`` with activation quantization: the first input of each module in ``activations`` (module path ->
  (quantizer, state), as ``QuantizeResult.activations``) goes through ``quantizer.fake_quant`` first, exactly as in
  reconstruction. Use it with the quantized params: ``quantized_apply(apply_fn, result.activations)(result.params,
  batch)``."""
  from flexround_jax.engine import graph  # pylint: disable=g-import-not-at-top

  def apply(params, *args, **kwargs):
    with graph.map_inputs(input_fns(activations)):
      return apply_fn(params, *args, **kwargs)
  return apply


def input_fns(activations: Mapping[str, tuple[ActQuantizer, Mapping]]) -> dict[str, Callable]:
  """{module path: x -> quantizer.fake_quant(x, state)} for ``engine.graph.map_inputs``."""
  return {path: (lambda x, q=q, st=st: q.fake_quant(x, st)) for path, (q, st) in activations.items()}


def to_tree(activations: Mapping[str, tuple[ActQuantizer, Mapping]]) -> tuple[dict, dict]:
  """(arrays, meta) for saving activation quantizers: arrays {'a00000': {'step', 'zero_point'}} for the static ones
  in sorted module order, meta {'modules': [...], 'quantizers': [describe(), ...]} (JSON) for all of them."""
  modules = sorted(activations)
  arrays = {}
  for i, m in enumerate(modules):
    q, state = activations[m]
    check_state(q, state, f'activation quantizer of {m!r}')
    if q.static:
      arrays[f'a{i:05d}'] = {k: np.asarray(v) for k, v in state.items()}
  return arrays, {'modules': modules, 'quantizers': [activations[m][0].describe() for m in modules]}


def from_tree(arrays: Mapping, meta: Mapping, where: str) -> dict[str, tuple[ActQuantizer, dict]]:
  """Inverse of ``to_tree``, every entry checked (``check_state``); ValueError naming ``where`` otherwise."""
  modules, described = meta.get('modules'), meta.get('quantizers')
  if (not isinstance(modules, list) or not isinstance(described, list) or len(modules) != len(described)
      or not all(isinstance(m, str) for m in modules) or len(set(modules)) != len(modules)):
    raise ValueError(f"{where}: activation metadata 'modules' / 'quantizers' must be lists of equal length with "
                     f"distinct module paths")
  out, used = {}, set()
  for i, (m, d) in enumerate(zip(modules, described)):
    try:
      q = get(dict(d)) if isinstance(d, Mapping) else get(d)
    except ValueError as e:
      raise ValueError(f'{where}: activation quantizer of {m!r}: {e}') from e
    if q is None:
      raise ValueError(f'{where}: activation quantizer of {m!r} is missing')
    key = f'a{i:05d}'
    state = {k: np.asarray(v) for k, v in arrays.get(key, {}).items()}
    if q.static:
      used.add(key)
    out[m] = (q, check_state(q, state, f'{where}: activation quantizer of {m!r}'))
  stray = sorted(set(arrays) - used)
  if stray:
    raise ValueError(f'{where}: activation arrays {stray[:3]} belong to no static quantizer in the metadata')
  return out


def check_state(q: ActQuantizer, state: Mapping, where: str) -> dict:
  """A quantizer's state as stored: static: exactly a positive finite float32 scalar 'step' and an int32 scalar
  'zero_point' in [0, 2^bits - 1]; dynamic: empty. Returns it; ValueError naming ``where`` otherwise."""
  state = dict(state)
  if not q.static:
    if state:
      raise ValueError(f'{where}: {q!r} is dynamic and has no state, got {sorted(state)}')
    return state
  if set(state) != {'step', 'zero_point'}:
    raise ValueError(f"{where}: state must be {{'step', 'zero_point'}}, got {sorted(state)}")
  step, zp = np.asarray(state['step']), np.asarray(state['zero_point'])
  if step.shape != () or step.dtype != np.float32 or not np.isfinite(step) or not step > 0:
    raise ValueError(f'{where}: step must be a positive finite float32 scalar, got {step.dtype} {step.shape} {step}')
  if zp.shape != () or zp.dtype != np.int32 or not 0 <= int(zp) <= 2 ** q.bits - 1:
    raise ValueError(f'{where}: zero_point must be an int32 scalar in [0, {2 ** q.bits - 1}], got {zp.dtype} '
                     f'{zp.shape} {zp}')
  return state
