"""QuantConfig: everything ``quantize`` needs to know, validated once, with messages that name the field."""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

from flexround_jax.spec import QuantSpec

METHODS = ('rtn', 'adaround', 'flexround')
# Learning rates used when QuantConfig.lr is None: FlexRound as the official W4 Llama-2-7B script, AdaRound as BRECQ.
DEFAULT_LR = {'flexround': 3e-3, 'adaround': 1e-3, 'rtn': 0.0}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How ``flexround_jax.quantize`` reconstructs a model.

  Attributes:
    method: 'rtn' (no training), 'adaround' or 'flexround'.
    weight: default QuantSpec for every quantized kernel.
    blocks: regex, fully matched against '/'-joined module paths ('encoder/layer_3', 'BasicBlock_2'); each matching
      submodule is reconstructed as one block. Kernels outside every block are reconstructed layer by layer.
      None: every kernel layer-wise.
    iters: optimisation steps per block (the paper: 5k-20k).
    batch_size: samples per step (global, over all devices and processes).
    lr: Adam learning rate (cosine decay to 0 for FlexRound, constant for AdaRound, as BRECQ); None: per method.
    lr_s1: separate learning rate for FlexRound's log_s1 (None: same as lr).
    drop_prob: QDrop-style mixing: each element of a block's input is the quantized model's with probability
      ``1 - drop_prob`` and the float model's otherwise (0: the official setting, quantized inputs only).
    layer_bits: {regex on module path: bits} overriding ``weight.bits`` (first rule that fully matches wins).
    exclude: regex on module paths whose kernels stay float (None: quantize every kernel).
    adaround_lambda, adaround_beta, adaround_warmup: regulariser weight, (start, end) of the beta annealing and the
      warm-up fraction without regulariser (BRECQ: 0.01, (20, 2), 0.2; 0.1 for MobileNetV2).
    seed: drives minibatch sampling and drop masks.
    checkpoint_dir: absolute or relative folder; after every block an Orbax checkpoint lets a rerun resume.
    log_dir: folder for the JSONL log (default: checkpoint_dir, or none).
    dry_run: print the plan (blocks, kernels, bits, sizes, activation memory) and stop.
    num_devices: devices of the data mesh (None: all devices, reduced to a divisor of batch_size).
    spill_dir: keep the activation cache in memory-mapped files there instead of RAM.
    fallback_to_rtn: a block that ends worse than its RTN start keeps RTN (with a warning).
    progress: tqdm progress bars.
    eval_batch_size: samples per forward when caching activations and measuring block losses.
    keep_states: keep every kernel's trained quantizer state in ``QuantizeResult.states`` (for plots: S2, s3, s4).
    sample_shards: minibatches are stratified: each step draws batch_size / sample_shards samples from each of
      sample_shards equal, contiguous parts of the calibration set (None: one part per process, so each process
      samples from the shard it holds). A one-process run with sample_shards=P reproduces a P-process run.
  """

  method: str = 'flexround'
  weight: QuantSpec = QuantSpec(bits=4, granularity='per_channel')
  blocks: str | None = None
  iters: int = 5000
  batch_size: int = 32
  lr: float | None = None
  lr_s1: float | None = None
  drop_prob: float = 0.0
  layer_bits: Mapping[str, int] = dataclasses.field(default_factory=dict)
  exclude: str | None = None
  adaround_lambda: float = 0.01
  adaround_beta: tuple[float, float] = (20.0, 2.0)
  adaround_warmup: float = 0.2
  seed: int = 0
  checkpoint_dir: str | None = None
  log_dir: str | None = None
  dry_run: bool = False
  num_devices: int | None = None
  spill_dir: str | None = None
  fallback_to_rtn: bool = True
  progress: bool = True
  eval_batch_size: int = 64
  sample_shards: int | None = None
  keep_states: bool = False

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f'QuantConfig.method must be one of {METHODS}, got {self.method!r}')
    if not isinstance(self.weight, QuantSpec):
      raise ValueError(f'QuantConfig.weight must be a QuantSpec, got {type(self.weight).__name__}')
    for name in ('blocks', 'exclude'):
      pattern = getattr(self, name)
      if pattern is not None:
        _check_regex(pattern, f'QuantConfig.{name}')
    if not isinstance(self.layer_bits, Mapping):
      raise ValueError(f'QuantConfig.layer_bits must be a dict {{regex: bits}}, got {type(self.layer_bits).__name__}')
    for pattern, bits in self.layer_bits.items():
      _check_regex(pattern, 'QuantConfig.layer_bits key')
      self.weight.replace(bits=bits)  # raises with the QuantSpec message if bits is invalid
    for name in ('iters', 'batch_size', 'eval_batch_size'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == 'iters' else 1):
        raise ValueError(f'QuantConfig.{name} must be a {"non-negative" if name == "iters" else "positive"} '
                         f'integer, got {value!r}')
    for name in ('lr', 'lr_s1'):
      value = getattr(self, name)
      if value is not None and not (isinstance(value, (int, float)) and value >= 0):
        raise ValueError(f'QuantConfig.{name} must be a non-negative number or None, got {value!r}')
    if not 0.0 <= self.drop_prob <= 1.0:
      raise ValueError(f'QuantConfig.drop_prob must be in [0, 1], got {self.drop_prob!r}')
    if not 0.0 <= self.adaround_warmup < 1.0:
      raise ValueError(f'QuantConfig.adaround_warmup must be in [0, 1), got {self.adaround_warmup!r}')
    if len(tuple(self.adaround_beta)) != 2:
      raise ValueError(f'QuantConfig.adaround_beta must be (start, end), got {self.adaround_beta!r}')
    if self.sample_shards is not None and (not isinstance(self.sample_shards, int) or self.sample_shards < 1 or
                                           self.batch_size % self.sample_shards):
      raise ValueError(f'QuantConfig.sample_shards must be a positive integer dividing batch_size '
                       f'({self.batch_size}), got {self.sample_shards!r}')
    if self.num_devices is not None and (not isinstance(self.num_devices, int) or self.num_devices < 1):
      raise ValueError(f'QuantConfig.num_devices must be a positive integer or None, got {self.num_devices!r}')

  @property
  def learning_rate(self) -> float:
    return DEFAULT_LR[self.method] if self.lr is None else float(self.lr)

  def spec_for(self, module_path: str) -> QuantSpec:
    """QuantSpec of the kernel of ``module_path``: the first fully matching ``layer_bits`` rule sets the bits."""
    for pattern, bits in self.layer_bits.items():
      if re.fullmatch(pattern, module_path):
        return self.weight.replace(bits=bits)
    return self.weight

  def fingerprint_fields(self) -> dict:
    """The fields that change results (not where files go or how progress is shown)."""
    skip = {'checkpoint_dir', 'log_dir', 'dry_run', 'progress', 'spill_dir', 'num_devices', 'eval_batch_size',
            'keep_states'}
    out = {}
    for f in dataclasses.fields(self):
      if f.name not in skip:
        value = getattr(self, f.name)
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else (
            dict(value) if isinstance(value, Mapping) else value)
    return out


def _check_regex(pattern, where):
  if not isinstance(pattern, str):
    raise ValueError(f'{where} must be a regex string, got {pattern!r}')
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f'{where} {pattern!r} is not a valid regex: {e}') from e
