"""QuantConfig and Rule: everything ``quantize`` needs to know, validated once, with messages that name the field.

Which kernel gets what is said in one place: ``QuantConfig.rules``, an ordered list of ``Rule``s (regex on the
'/'-joined module path, ``re.fullmatch``; the first matching rule wins, as qwix's ``QuantizationRule``s). A rule
can change the bit-width, granularity, sign or initial grid, give the kernel another method, or skip it (keep it
float). Kernels no rule matches get ``QuantConfig.weight`` and ``QuantConfig.method``. Which params are kernels is
said by their name: 'kernel', and those named by ``QuantConfig.weight_params`` (``WeightParam``).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Mapping

from . import precision
from .. import methods as methods_lib
from ..quantizers import activation as act_lib
from ..quantizers.base import Method
from ..spec import QuantSpec

@dataclasses.dataclass(frozen=True)
class Rule:
  """Kernels of modules whose path fully matches ``pattern`` get these settings (None: keep the default).

  Attributes:
    pattern: regex, ``re.fullmatch``-ed against the module path ('encoder/layer_3/query', 'stem').
    bits, granularity, group_size, symmetric, grid_init: override the fields of ``QuantConfig.weight``. Setting
      ``granularity`` to 'per_tensor' or 'per_channel' drops the default's group size, ``symmetric=False`` its
      ``narrow_range``.
    method: a Method, a registered name or a {'name': ..., knobs} mapping for these kernels.
    activation: the quantizer of these kernels' inputs (an ActQuantizer, a registered name or a {'name': ...,
      knobs} mapping), or 'float' to keep their inputs float; None: ``QuantConfig.activation``.
    skip: keep these kernels float (not quantized at all, inputs included).
  """

  pattern: str
  bits: int | None = None
  granularity: str | None = None
  group_size: int | None = None
  symmetric: bool | None = None
  grid_init: str | None = None
  method: Any = None
  activation: Any = None
  skip: bool = False

  def __post_init__(self):
    check_regex(self.pattern, 'Rule.pattern')
    if self.activation is not None and self.activation != act_lib.FLOAT:
      try:
        object.__setattr__(self, 'activation', act_lib.get(self.activation))
      except ValueError as e:
        raise ValueError(f'Rule {self.pattern!r} activation: {e} (or {act_lib.FLOAT!r}: inputs stay float)') from e
    if self.method is not None:
      try:
        object.__setattr__(self, 'method', methods_lib.get(self.method))
      except ValueError as e:
        raise ValueError(f'Rule {self.pattern!r} method: {e}') from e
    if not isinstance(self.skip, bool):
      raise ValueError(f'Rule.skip must be a bool, got {self.skip!r}')
    if self.skip and any(getattr(self, f) is not None for f in ('bits', 'granularity', 'group_size', 'symmetric',
                                                                 'grid_init', 'method', 'activation')):
      raise ValueError(f'Rule {self.pattern!r}: skip=True keeps the kernels float; it takes no other setting')

  def matches(self, module_path: str) -> bool:
    return re.fullmatch(self.pattern, module_path) is not None

  def apply(self, spec: QuantSpec) -> QuantSpec:
    """``spec`` with this rule's overrides (raises the QuantSpec error, naming the rule, when they do not fit)."""
    changes = {f: getattr(self, f) for f in ('bits', 'granularity', 'symmetric', 'grid_init')
               if getattr(self, f) is not None}
    if self.group_size is not None:
      changes['group_size'] = self.group_size
    elif self.granularity is not None and self.granularity != 'per_group':
      changes['group_size'] = None
    if self.symmetric is False:
      changes['narrow_range'] = False
    try:
      return spec.replace(**changes)
    except ValueError as e:
      raise ValueError(f'Rule {self.pattern!r}: {e}') from e

  def describe(self) -> dict:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    out['method'] = None if self.method is None else self.method.describe()
    out['activation'] = _describe_act(self.activation)
    return out


@dataclasses.dataclass(frozen=True)
class WeightParam:
  """A weight not called 'kernel' to quantize: the param ``name`` of every module whose path fully matches ``pattern``
  (an einsum module's 'w', as in Google DeepMind's ``gemma``). Rules then set its bits and method as a kernel's.

  The quantizers see a weight as a 2-D (in, out) view: ``in_axes`` are the weight's axes contracted with the module's
  input, the others its outputs, each in the weight's order; the view is the weight transposed to (in_axes, the
  rest) and reshaped. Per-channel grids are one per output element, groups run along the flattened inputs.

  Attributes:
    pattern: regex, ``re.fullmatch``-ed against the module path ('layer_0/attn/q_einsum').
    name: the param's name in those modules ('w'); 'kernel' params need no WeightParam.
    in_axes: the weight's input (contracted) axes, e.g. (1,) for a weight (N, D, H) used as 'BTD,NDH->BTNH'
      (``WeightParam.einsum`` reads them from the equation). None: the weight must be 2-D, (in, out).
  """

  pattern: str
  name: str
  in_axes: tuple[int, ...] | None = None

  def __post_init__(self):
    check_regex(self.pattern, 'WeightParam.pattern')
    if not isinstance(self.name, str) or not self.name or '/' in self.name:
      raise ValueError(f'WeightParam {self.pattern!r}: name must be a param name (a non-empty str without "/"), '
                       f'got {self.name!r}')
    if self.name == 'kernel':
      raise ValueError(f'WeightParam {self.pattern!r}: \'kernel\' params are quantized without a WeightParam; '
                       f'name the param of modules whose weight has another name')
    if self.in_axes is not None:
      axes = self.in_axes
      if (not isinstance(axes, (list, tuple)) or not axes or len(set(axes)) != len(axes) or
          any(isinstance(a, bool) or not isinstance(a, int) or a < 0 for a in axes)):
        raise ValueError(f'WeightParam {self.pattern!r}: in_axes must be distinct non-negative axis numbers, got '
                         f'{axes!r}')
      object.__setattr__(self, 'in_axes', tuple(axes))

  @classmethod
  def einsum(cls, pattern: str, equation: str, name: str = 'w') -> WeightParam:
    """The WeightParam of a weight used as the second operand of ``jnp.einsum(equation, x, w)``: its input axes are
    those whose index is in ``x`` and not in the output; every other index must be in the output and not in ``x``
    (an index in all three, or in ``w`` alone, is not a matmul: ValueError)."""
    eq = equation.replace(' ', '') if isinstance(equation, str) else ''
    if eq.count('->') != 1 or eq.split('->')[0].count(',') != 1 or '.' in eq.split('->')[0].split(',')[1]:
      raise ValueError(f'WeightParam.einsum {pattern!r}: equation must read "x,w->out" with explicit weight indices, '
                       f'got {equation!r}')
    (x, w), out = eq.split('->')[0].split(','), eq.split('->')[1]
    in_axes = []
    for axis, index in enumerate(w):
      if index in x and index not in out:
        in_axes.append(axis)
      elif not (index in out and index not in x):
        raise ValueError(f'WeightParam.einsum {pattern!r}: index {index!r} of the weight ({w!r} in {equation!r}) '
                         f'is {"in the input and the output" if index in x else "summed alone"}: not an input '
                         f'or an output axis; declare in_axes yourself or keep the module float')
    return cls(pattern, name, tuple(in_axes))

  def matches(self, module_path: str) -> bool:
    return re.fullmatch(self.pattern, module_path) is not None

  def describe(self) -> dict:
    return {'pattern': self.pattern, 'name': self.name,
            'in_axes': None if self.in_axes is None else list(self.in_axes)}


def _records(values, cls, field: str) -> tuple:
  """``values`` (a list of ``cls`` records or mappings of their fields) as a tuple of ``cls``; ValueError naming
  ``QuantConfig.<field>`` (and the index) otherwise."""
  if isinstance(values, (str, Mapping, cls)) or not isinstance(values, (list, tuple)):
    raise ValueError(f'QuantConfig.{field} must be a list of {cls.__name__}s, got {type(values).__name__}')
  out = []
  for i, value in enumerate(values):
    if isinstance(value, Mapping):
      try:
        value = cls(**value)
      except TypeError as e:
        raise ValueError(f'QuantConfig.{field}[{i}]: {e}') from e
    if not isinstance(value, cls):
      raise ValueError(f'QuantConfig.{field}[{i}] must be a {cls.__name__} or a mapping of its fields, got {value!r}')
    out.append(value)
  return tuple(out)


def _describe_act(act):
  return act.describe() if isinstance(act, act_lib.ActQuantizer) else act


# QuantConfig fields that cannot change the codes (where files go, what is shown or kept). Everything else is in the
# checkpoint fingerprint, so a resumed run is the run that was asked for; tests/test_trust.py fails when a new field
# is added without a decision here.
RESULT_NEUTRAL = frozenset({'checkpoint_dir', 'log_dir', 'dry_run', 'progress', 'spill_dir', 'keep_states'})
# Fields that enter the fingerprint in resolved form: num_devices=None means "all devices", so the fingerprint holds
# the device count the data mesh really has (it changes the order of the gradient sums, hence the codes).
FINGERPRINTED_ELSEWHERE = {'num_devices': 'the data mesh size'}
# Fingerprinted only when some kernel input is quantized (a weight-only run's result cannot depend on them).
ACTIVATION_FIELDS = ('activation', 'act_calib_samples')
# Fingerprinted only when set (not at this default): runs that do not use them keep the fingerprints of runs before
# they existed.
FINGERPRINTED_WHEN_SET = {'weight_params': [], 'compute_dtype': 'float32', 'fallback_samples': None,
                          'cache_dtype': 'float32'}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How ``quantize`` reconstructs a model.

  Attributes:
    method: the default weight-quantization method: a Method (built by a factory of ``methods``, with its knobs),
      a name in ``methods.REGISTRY`` for the factory's defaults, or a mapping {'name': ..., knobs} (config files).
      Stored as a Method.
    weight: default QuantSpec for every quantized kernel.
    rules: ordered Rules (or mappings of Rule fields) deciding per module path: bits, granularity, method, skip.
    blocks: regex, fully matched against '/'-joined module paths ('encoder/layer_3', 'BasicBlock_2'); each matching
      submodule is reconstructed as one block. Kernels outside every block are reconstructed layer by layer.
      None: every kernel layer-wise.
    iters: optimisation steps per block for gradient-trained methods (the paper: 5k-20k).
    batch_size: samples per step (global, over all devices and processes).
    drop_prob: QDrop-style mixing: each element of a block's input is the quantized model's with probability
      ``1 - drop_prob`` and the float model's otherwise (0: the official setting, quantized inputs only).
    seed: drives minibatch sampling and drop masks (methods with random initialisations have their own seed knob).
    checkpoint_dir: absolute or relative folder; after every block an Orbax checkpoint lets a rerun resume.
    log_dir: folder for the JSONL log (default: checkpoint_dir, or none).
    dry_run: print the plan (blocks, kernels, bits, methods, sizes, activation memory) and stop.
    num_devices: devices of the run's mesh (None: all devices; the data axis is reduced to a divisor of
      batch_size).
    model_devices: devices each block's kernels, quantizer state and optimizer moments are split over, along the
      output channel (the mesh's 'model' axis; FSDP-style, so per-channel and per-group grids stay local). The
      calibration batch is split over the remaining num_devices / model_devices ('data'). 1: every device holds the
      whole block (plain data parallelism). Within one process.
    spill_dir: keep the activation cache in memory-mapped files there instead of RAM, and move every finished
      unit's quantized params and integer codes to files in a new ``quantized_*`` folder there (the result's
      ``params`` and ``qtensors`` read them as memory maps, so host memory does not grow unit by unit; delete the
      folder when done with the result). With params from ``weights.load_params`` (memory maps), a model larger
      than host RAM is quantized unit by unit.
    fallback_to_rtn: a block that ends worse than its RTN start keeps RTN, and one trained from a closed-form start
      (GPTQ) that ends worse than that start keeps the start (with a warning; ``kept_start`` in the report).
    progress: tqdm progress bars.
    eval_batch_size: samples per forward when caching activations, measuring block losses and accumulating
      Hessians.
    sample_shards: minibatches are stratified: each step draws batch_size / sample_shards samples from each of
      sample_shards equal, contiguous parts of the calibration set (None: one part per process, so each process
      samples from the shard it holds). A one-process run with sample_shards=P reproduces a P-process run.
    keep_states: keep every kernel's trained quantizer state in ``QuantizeResult.states`` (for plots: S2, s3, s4).
    activation: quantizer of the input of every quantized kernel (``quantizers.activation.lsq(bits)``: QDrop's
      learned per-tensor step, ``per_token(bits)``: dynamic per token), or None (weights only). A name or a
      {'name': ..., knobs} mapping is accepted. Static grids are calibrated on the float model's inputs of the unit
      (the first ``act_calib_samples`` samples, as QDrop), and learned steps are trained jointly with the weights,
      each by its own optax transformation; with ``drop_prob > 0`` each quantized input is also QDrop-mixed with
      its unquantized value. Rules change it per module (``Rule(activation=...)``, 'float').
    act_calib_samples: calibration samples (per process) the static activation grids are searched on.
    weight_params: ``WeightParam``s (or mappings of their fields) naming weights not called 'kernel' to quantize
      too (an einsum module's 'w'), with their input axes. Every 'kernel' param of rank >= 2 is quantized anyway.
    compute_dtype: precision of the training step's matmuls and convolutions (forward and backward): 'float32', or
      'bfloat16' (bfloat16 operands, float32 accumulation and outputs, as mixed-precision training;
      ``engine.precision``). The fake-quant kernel is formed in float32 and cast for the product (the gradient goes
      straight through the cast); quantizer state, optimizer moments, losses and targets stay float32, and the
      passes that measure losses and make the next unit's inputs run in float32, so reported losses compare across
      settings. ``finalize`` and the deployed grid do not change.
    fallback_samples: the RTN start's (and a closed-form start's) reference loss, and the fall-back comparison with
      the trained kernels, use this many calibration samples (per process; a fixed subset drawn with ``seed``,
      recorded in the report) instead of all of them: the RTN pass then costs that fraction of a full pass. The
      trained kernels' loss on every sample still comes from the pass that makes the next unit's inputs
      (``loss_final``); the subset losses are reported as ``loss_rtn`` / ``loss_trained_subset``. None: every
      sample (the behaviour before this field).
    cache_dtype: storage dtype of the floating arrays of the activation cache (block inputs in the quantized and the
      float model, float targets, the next unit's inputs): 'float32', or 'bfloat16' (half the cache's memory; each
      cached value rounded to bfloat16 and read back as float32, so every computation stays as it is). Integer
      inputs (positions, masks) keep their dtype.
  """

  method: Any = methods_lib.DEFAULT
  weight: QuantSpec = QuantSpec(bits=4, granularity='per_channel')
  rules: tuple = ()
  blocks: str | None = None
  iters: int = 5000
  batch_size: int = 32
  drop_prob: float = 0.0
  seed: int = 0
  checkpoint_dir: str | None = None
  log_dir: str | None = None
  dry_run: bool = False
  num_devices: int | None = None
  model_devices: int = 1
  spill_dir: str | None = None
  fallback_to_rtn: bool = True
  progress: bool = True
  eval_batch_size: int = 64
  sample_shards: int | None = None
  keep_states: bool = False
  activation: Any = None
  act_calib_samples: int = 256
  weight_params: tuple = ()
  compute_dtype: str = 'float32'
  fallback_samples: int | None = None
  cache_dtype: str = 'float32'

  def __post_init__(self):
    try:
      object.__setattr__(self, 'method', methods_lib.get(self.method))
    except ValueError as e:
      raise ValueError(f'QuantConfig.method: {e}') from e
    try:
      object.__setattr__(self, 'activation', act_lib.get(self.activation))
    except ValueError as e:
      raise ValueError(f'QuantConfig.activation: {e}') from e
    if not isinstance(self.weight, QuantSpec):
      raise ValueError(f'QuantConfig.weight must be a QuantSpec, got {type(self.weight).__name__}')
    rules = _records(self.rules, Rule, 'rules')
    for rule in rules:
      rule.apply(self.weight)      # raises now, naming the rule, if its overrides do not make a valid spec
    object.__setattr__(self, 'rules', rules)
    object.__setattr__(self, 'weight_params', _records(self.weight_params, WeightParam, 'weight_params'))
    if self.blocks is not None:
      check_regex(self.blocks, 'QuantConfig.blocks')
    for name in ('iters', 'batch_size', 'eval_batch_size', 'act_calib_samples'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == 'iters' else 1):
        raise ValueError(f'QuantConfig.{name} must be a {"non-negative" if name == "iters" else "positive"} '
                         f'integer, got {value!r}')
    if isinstance(self.drop_prob, bool) or not isinstance(self.drop_prob, (int, float)) or not 0 <= self.drop_prob <= 1:
      raise ValueError(f'QuantConfig.drop_prob must be a number in [0, 1], got {self.drop_prob!r}')
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
      raise ValueError(f'QuantConfig.seed must be a non-negative integer, got {self.seed!r}')
    if self.sample_shards is not None and (isinstance(self.sample_shards, bool) or
                                           not isinstance(self.sample_shards, int) or self.sample_shards < 1 or
                                           self.batch_size % self.sample_shards):
      raise ValueError(f'QuantConfig.sample_shards must be a positive integer dividing batch_size '
                       f'({self.batch_size}), got {self.sample_shards!r}')
    if self.num_devices is not None and (isinstance(self.num_devices, bool) or not isinstance(self.num_devices, int)
                                         or self.num_devices < 1):
      raise ValueError(f'QuantConfig.num_devices must be a positive integer or None, got {self.num_devices!r}')
    if isinstance(self.model_devices, bool) or not isinstance(self.model_devices, int) or self.model_devices < 1:
      raise ValueError(f'QuantConfig.model_devices must be a positive integer, got {self.model_devices!r}')
    if self.num_devices is not None and self.num_devices % self.model_devices:
      raise ValueError(f'QuantConfig.num_devices={self.num_devices} is not a multiple of '
                       f'model_devices={self.model_devices}')
    if self.compute_dtype not in precision.DTYPES:
      raise ValueError(f'QuantConfig.compute_dtype must be one of {precision.DTYPES}, got {self.compute_dtype!r}')
    if self.cache_dtype not in precision.DTYPES:
      raise ValueError(f'QuantConfig.cache_dtype must be one of {precision.DTYPES}, got {self.cache_dtype!r}')
    if self.fallback_samples is not None and (isinstance(self.fallback_samples, bool) or
                                              not isinstance(self.fallback_samples, int) or self.fallback_samples < 1):
      raise ValueError(f'QuantConfig.fallback_samples must be a positive integer or None (every sample), got '
                       f'{self.fallback_samples!r}')
    for name in ('dry_run', 'fallback_to_rtn', 'progress', 'keep_states'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'QuantConfig.{name} must be a bool, got {getattr(self, name)!r}')

  def resolve(self, module_path: str) -> tuple[QuantSpec, Method] | None:
    """(spec, method) for the kernel of ``module_path`` from the first matching rule; None if it is skipped."""
    for rule in self.rules:
      if rule.matches(module_path):
        if rule.skip:
          return None
        return rule.apply(self.weight), rule.method or self.method
    return self.weight, self.method

  def resolve_activation(self, module_path: str):
    """The ActQuantizer of the input of ``module_path``'s kernel (first matching rule), or None (float input)."""
    for rule in self.rules:
      if rule.matches(module_path):
        if rule.skip or rule.activation == act_lib.FLOAT:
          return None
        return rule.activation or self.activation
    return self.activation

  def act_quantizers(self) -> list:
    """Every activation quantizer the config can use, each once."""
    out = [self.activation] if self.activation is not None else []
    for rule in self.rules:
      if isinstance(rule.activation, act_lib.ActQuantizer) and all(rule.activation is not a for a in out):
        out.append(rule.activation)
    return out

  def methods(self) -> list[Method]:
    """Every method the config can use (default first), each once."""
    out = [self.method]
    for rule in self.rules:
      if rule.method is not None and all(rule.method is not m for m in out):
        out.append(rule.method)
    return out

  def describe(self) -> dict:
    """JSON-ready description of every field (methods and rules as dicts)."""
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name == 'method':
        value = value.describe()
      elif f.name == 'activation':
        value = _describe_act(value)
      elif f.name in ('rules', 'weight_params'):
        value = [r.describe() for r in value]
      elif isinstance(value, QuantSpec):
        value = dataclasses.asdict(value)
      out[f.name] = value
    return out

  def fingerprint_fields(self) -> dict:
    """Every field that can change the result: all but ``RESULT_NEUTRAL`` and ``FINGERPRINTED_ELSEWHERE``."""
    skip = RESULT_NEUTRAL | set(FINGERPRINTED_ELSEWHERE)
    out = {k: v for k, v in self.describe().items() if k not in skip}
    if not self.act_quantizers():
      # Weight only: the activation fields cannot change the result, and leaving them out keeps the fingerprints
      # (so the checkpoints) of weight-only runs made before these fields existed.
      for k in ACTIVATION_FIELDS:
        out.pop(k)
      for rule in out['rules']:
        rule.pop('activation')
    for k, default in FINGERPRINTED_WHEN_SET.items():
      if out[k] == default:
        out.pop(k)
    if not self.weight.narrow_range:   # QuantSpec fields added later: runs that do not set them keep their fingerprints
      out['weight'].pop('narrow_range')
    return out

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> QuantConfig:
    """QuantConfig from a (config-file) mapping of its fields; ``weight`` may be a mapping of QuantSpec fields."""
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f'unknown QuantConfig fields {sorted(unknown)}; fields: '
                       f'{[f.name for f in dataclasses.fields(cls)]}')
    if isinstance(d.get('weight'), Mapping):
      try:
        d['weight'] = QuantSpec(**d['weight'])
      except TypeError as e:
        raise ValueError(f'QuantConfig.weight: {e}') from e
    for name in ('rules', 'weight_params'):
      if name in d:
        d[name] = tuple(dict(r) if isinstance(r, Mapping) else r for r in (d[name] or ()))
    return cls(**d)



def field_types(cls) -> dict[str, Any]:
  """The type of each field of dataclass ``cls``, optional ones unwrapped (for config placeholders):
  'str | None' -> str."""
  out = {}
  for name, hint in typing.get_type_hints(cls).items():
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    out[name] = args[0] if len(args) == 1 else hint
  return out


def check_regex(pattern, where):
  if not isinstance(pattern, str):
    raise ValueError(f'{where} must be a regex string, got {pattern!r}')
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f'{where} {pattern!r} is not a valid regex: {e}') from e
