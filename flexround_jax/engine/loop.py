"""``quantize``: block-wise reconstruction of any Flax model (the FlexRound / BRECQ procedure).

For each unit (``plan``), in forward order: its inputs x_q in the model whose earlier units are already quantized
(and x_fp in the float model), the float unit's targets y_fp, then ``unit.UnitReconstructor.reconstruct`` (solve,
train, finalize) and the quantized model goes on with the unit's integer codes. Only the current unit's inputs
and targets are held (host RAM, or memory-mapped files with ``spill_dir``); a chain unit's inputs are the previous
unit's outputs, otherwise the (partially quantized) model runs up to the unit, stopping there.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import os
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import treepath, weights
from . import activations, graph
from . import unit as unit_lib
from . import plan as plan_lib
from .activations import ActivationStore
from .config import QuantConfig
from .unit import Compiled, UnitReconstructor
from ..qtensor import QTensor
from ..quantizers import activation as act_lib


@dataclasses.dataclass
class QuantizeResult:
  """What ``quantize`` returns.

  Attributes:
    params: same tree (and type) as the input params, every quantized kernel replaced by its dequantized value.
    qtensors: {'/'-joined kernel path: QTensor} for every quantized kernel (Dense-like kernels of rank > 2, e.g.
      DenseGeneral, are quantized as their 2-D (in, out) view, weights named by a ``WeightParam`` as theirs, with
      ``QTensor.axes``; ``dequantize_params`` lays them back out).
    report: per unit: unit, kind, kernels, bits, methods, loss_rtn (loss at the RTN start), loss_final (of the
      kept kernels), loss_trained (before any fall-back), iters, seconds (the whole unit), seconds_train (its
      optimizer steps, compilation included when new_train_step), fell_back_to_rtn, loss_curve ([step, mean
      training loss] pairs, one per dispatch of K steps), new_train_step (whether the unit compiled its own step),
      state_bytes_per_device (params, quantizer and optimizer state of the unit on one device while training),
      method_facts (per kernel, from methods that report, e.g. GPTQ's damping). With
      ``QuantConfig.fallback_samples``: loss_rtn (and loss_start) are on that subset of the samples, as are
      loss_final_subset and loss_trained_subset (what the fall-back compared), and fallback_subset lists the
      samples; loss_final and loss_trained stay on every sample.
    resumed_units: how many leading units were restored from ``checkpoint_dir`` instead of run by this call (0: it
      ran them all). Their ``report`` entries, ``seconds`` included, are the earlier process's.
    plan: the units, kernels and sizes, as printed by ``dry_run``.
    config: the QuantConfig.
    states: with ``QuantConfig.keep_states``, the final quantizer state of every kernel (FlexRound: log_s1..4),
      keyed like ``qtensors`` (units restored from a checkpoint have none).
    activations: {module path: (ActQuantizer, state)} for every kernel whose input is quantized (static grids:
      {'step', 'zero_point'}; dynamic ones: {}). ``apply_quantized`` runs the model with them.
  """

  params: Any
  qtensors: dict[str, QTensor]
  report: list[dict]
  plan: list[dict]
  config: QuantConfig
  states: dict[str, dict] = dataclasses.field(default_factory=dict)
  activations: dict[str, tuple] = dataclasses.field(default_factory=dict)
  resumed_units: int = 0

  def apply_quantized(self, apply_fn: Callable) -> Callable:
    """``(params, batch) -> output`` of the model as reconstructed: ``apply_fn`` with this result's activation
    quantizers at their kernels' inputs (``apply_fn`` itself when only weights are quantized). Call it with
    ``self.params`` (or params dequantized from a saved result)."""
    return act_lib.quantized_apply(apply_fn, self.activations) if self.activations else apply_fn


def quantize(params, apply_fn: Callable, calib_data, config: QuantConfig = QuantConfig()) -> QuantizeResult:
  """Quantizes every kernel of a Flax model by block-wise reconstruction on ``calib_data``.

  Args:
    params: linen ``variables['params']`` (nested dict) or an nnx ``State`` of ``nnx.Param``.
    apply_fn: the model's pure forward ``apply_fn(params, batch) -> output``; other collections (batch_stats, ...)
      are closed over. Must run with ``params`` in the same form it is given here.
    calib_data: an array, a dict of arrays, an iterable of batches, or a TFDS data source; the samples are the
      leading axis. In a multi-process run, each process passes its own shard (same size on every process).
    config: a QuantConfig.

  Returns:
    QuantizeResult.
  """
  if not isinstance(config, QuantConfig):
    raise ValueError(f'config must be a QuantConfig, got {type(config).__name__}')
  if not callable(apply_fn):
    raise ValueError('apply_fn must be callable as apply_fn(params, batch)')
  is_nnx = isinstance(params, nnx.State)
  tree = nnx.to_pure_dict(params) if is_nnx else params
  plan_lib.check_params(tree)
  user_structure = jax.tree.structure(params)

  def to_user(t):
    return jax.tree.unflatten(user_structure, jax.tree.leaves(t)) if is_nnx else t

  def model_fn(t, batch):
    return apply_fn(to_user(t), batch)

  calib = activations.as_arrays(calib_data)
  n = activations.num_samples(calib)
  units = plan_lib.plan_units(model_fn, tree, calib, config)
  release_free_host_memory()   # the probe traces of every layer, freed but kept by the allocator
  plan = plan_lib.describe(units, n, config)
  sizes = {}
  for u, p in zip(units, plan):   # identical units (static_key) have identical states
    if u.static_key not in sizes:
      sizes[u.static_key] = unit_lib.state_bytes(u, treepath.get_subtree(tree, u.prefix), config.iters,
                                                  config.model_devices)
    p['state_bytes'], p['state_bytes_exact'] = sizes[u.static_key]
  if any(m.trains for u in units for m in u.methods):   # checked in a dry run too: it validates what a run does
    if config.batch_size > n * jax.process_count():
      raise ValueError(f'QuantConfig.batch_size={config.batch_size} is larger than the {n} calibration samples')
    activations.Sampler.check(n, config.batch_size, config.sample_shards)
  if config.checkpoint_dir and jax.process_count() > 1:
    raise ValueError('QuantConfig.checkpoint_dir is not supported in multi-process runs yet')
  if jax.process_count() > 1 and any(u.acts[i].static for u in units for i in u.act_paths()):
    raise ValueError('static activation quantizers (QuantConfig.activation) are calibrated per process and are not '
                     'supported in multi-process runs yet; use a dynamic one (per_token) or one process')
  if config.dry_run:
    plan_lib.print_plan(plan, n, config)
    if config.checkpoint_dir and os.path.isdir(os.path.join(config.checkpoint_dir, 'units')):
      # A dry run validates what the run would do: an existing checkpoint must be this run's, and intact.
      ckpt = _checkpointer(model_fn, tree, calib, config, activations.Placement.of(config))
      try:
        resumed = ckpt.restore(units)
      finally:
        ckpt.close()
      if resumed is not None:
        print(f'  checkpoint_dir {config.checkpoint_dir}: this run resumes after {resumed[0]} of {len(units)} units')
    return QuantizeResult(params=params, qtensors={}, report=[], plan=plan, config=config)
  tree_q, qtensors, report, states, acts, resumed = _run(model_fn, tree, calib, units, config)
  return QuantizeResult(params=to_user(tree_q), qtensors=qtensors, report=report, plan=plan, config=config,
                        states=states, activations=acts, resumed_units=resumed)


def dequantize_params(params, qtensors: dict[str, QTensor]):
  """``params`` with each kernel named in ``qtensors`` replaced by ``qt.to_weight`` (dequantized, laid out as the
  kernel)."""
  is_nnx = isinstance(params, nnx.State)
  tree = nnx.to_pure_dict(params) if is_nnx else params
  keys = treepath.flatten_keys(tree)
  for name, qt in qtensors.items():
    if name not in keys:
      raise ValueError(f'qtensors names kernel {name!r}, which is not in params')
    leaf = treepath.get_subtree(tree, keys[name])
    tree = treepath.set_leaf(tree, keys[name], qt.to_weight(np.shape(leaf), jnp.asarray(leaf).dtype))
  return jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(tree)) if is_nnx else tree


def _checkpointer(model_fn, fp_tree, calib, config: QuantConfig, placement: activations.Placement):
  """The run's Checkpointer, its fingerprint taken from everything that can change the result."""
  from . import checkpoint  # pylint: disable=g-import-not-at-top  (Orbax only when checkpointing)
  digest = checkpoint.model_digest(model_fn, fp_tree, activations.take(calib, np.arange(1)))
  return checkpoint.Checkpointer(config.checkpoint_dir,
                                 checkpoint.fingerprint(fp_tree, calib, config, digest, placement.mesh.size))


def _run(model_fn, fp_tree, calib, units: list[plan_lib.Unit], config: QuantConfig):
  """The unit loop; returns (quantized tree, qtensors, report, kept states, activation quantizers, units restored
  from the checkpoint)."""
  placement = activations.Placement.of(config)
  n = activations.num_samples(calib)
  log_file = None
  log_dir = config.log_dir or config.checkpoint_dir
  if log_dir:
    os.makedirs(log_dir, exist_ok=True)
    log_file = os.path.join(os.path.abspath(log_dir), 'quantize_log.jsonl')

  def log(**record):
    if log_file and jax.process_index() == 0:
      with open(log_file, 'a') as f:
        f.write(json.dumps({'time': time.time(), **record}) + '\n')

  ckpt = _checkpointer(model_fn, fp_tree, calib, config, placement) if config.checkpoint_dir else None
  recon = UnitReconstructor(config, placement, n, Compiled(), log)
  inputs_fns: dict[tuple, Callable] = {}
  acts: dict[str, tuple] = {}   # module path -> (ActQuantizer, state) of the finished units' kernel inputs

  def unit_inputs(unit, tree, quantized: bool) -> ActivationStore:
    """The unit's batched inputs when ``tree`` runs on every calibration sample (forward stops at the unit);
    ``quantized``: with the finished units' activation quantizers."""
    paths = tuple(acts) if quantized else ()
    key = (unit.index, paths)
    if key not in inputs_fns:
      quantizers = [acts[p][0] for p in paths]

      def fn(t_states, batch, unit=unit):
        t, act_states = t_states
        with graph.map_inputs(act_lib.input_fns(dict(zip(paths, zip(quantizers, act_states))))):
          args, kwargs = graph.inputs_of(model_fn, t, batch, unit.name)
        return [l for l, b in zip(jax.tree.leaves((args, kwargs)), unit.batched) if b]
      # Outputs split over the samples on the engine's mesh, also when params the user placed on another mesh
      # steer XLA's sharding propagation.
      inputs_fns[key] = jax.jit(fn, out_shardings=jax.sharding.NamedSharding(placement.local_mesh,
                                                                            jax.sharding.PartitionSpec('data')))
    store = ActivationStore(n, config.spill_dir, config.cache_dtype)
    return placement.map(inputs_fns[key], (tree, [acts[p][1] for p in paths]), calib, store, recon.chunk)

  tree_q, qtensors, report, states = fp_tree, {}, [], {}
  start_index, x_q, x_fp = 0, None, None
  spilled = SpilledArrays(config.spill_dir) if config.spill_dir else None

  def engine_placed(unit_params):
    """A unit's params with leaves the user placed (a NamedSharding, maybe on another mesh) moved to the
    engine's placement for the unit's computations; other leaves are used where they are."""
    return jax.tree.map(lambda x: placement.state(x) if _user_placed(x) else x, unit_params)

  def finish(unit, fp_unit, unit_qtensors: dict[str, QTensor]):
    """Records a finished unit's QTensors and puts its dequantized params into ``tree_q`` (both moved to files
    with ``spill_dir``, so the rest of the run reads them from disk as it reads ``fp_tree``); returns the params."""
    nonlocal tree_q
    if spilled is not None:
      unit_qtensors = {name: dataclasses.replace(qt, codes=spilled.put(f'{name}.codes', qt.codes))
                       for name, qt in unit_qtensors.items()}
    else:   # codes laid out like their kernel (the same shape unless a DenseGeneral kernel was viewed as 2-D)
      fp_kernels = {name: treepath.get_subtree(fp_unit, unit.rel(k)) for k, name in zip(unit.kernels,
                                                                                       unit.kernel_names())}
      unit_qtensors = {name: dataclasses.replace(qt, codes=_placed_like(fp_kernels[name], qt.codes))
                       for name, qt in unit_qtensors.items()}
    qtensors.update(unit_qtensors)
    q_unit = dequantize_params(fp_unit, {treepath.path_str(unit.rel(k)): unit_qtensors[name]
                                         for k, name in zip(unit.kernels, unit.kernel_names())})
    if spilled is not None:
      q_unit = spilled.put_tree(treepath.path_str(unit.prefix), q_unit)
    else:
      q_unit = jax.tree.map(_placed_like, fp_unit, q_unit)
    tree_q = treepath.set_leaf(tree_q, tuple(unit.prefix), q_unit)
    return q_unit
  if ckpt is not None:
    restored = ckpt.restore(units)
    if restored is not None:
      start_index, restored_qtensors, report, cached = restored
      for u in units[:start_index]:
        finish(u, treepath.get_subtree(fp_tree, u.prefix), {n: restored_qtensors[n] for n in u.kernel_names()})
      acts.update(_acts_from_report(units[:start_index], report))
      if cached is not None:
        x_q = ActivationStore.from_arrays(cached['x_q'], config.spill_dir, config.cache_dtype)
        x_fp = ActivationStore.from_arrays(cached['x_fp'], config.spill_dir, config.cache_dtype)
      print(f'quantize: resuming from {config.checkpoint_dir} at unit {start_index}/{len(units)}')
      log(event='resume', unit_index=start_index)

  for unit in units[start_index:]:
    t0 = time.time()
    if x_q is None:
      x_q = unit_inputs(unit, tree_q, quantized=True)
      x_fp = unit_inputs(unit, fp_tree, quantized=False)
      weights.release_pages((fp_tree, tree_q))   # what the forward read of memory-mapped params (the embedding)
    user_unit = treepath.get_subtree(fp_tree, unit.prefix)
    fp_unit = engine_placed(user_unit)
    y_fp = recon.forward(unit, fp_unit, x_fp)
    log(event='unit_start', unit=unit.name, index=unit.index)
    nxt = units[unit.index + 1] if unit.index + 1 < len(units) else None
    chain = nxt is not None and nxt.chain_from_previous
    result = recon.reconstruct(unit, fp_unit, x_q, x_fp, y_fp, keep_outputs=chain)
    result.report['seconds'] = round(time.time() - t0, 3)
    report.append(result.report)
    log(event='unit_end', **result.report)
    states.update(result.states)
    acts.update({m: (unit.acts[i], result.act_states[m]) for i, m in
                 ((i, unit.kernels[i].module) for i in unit.act_paths())})
    q_unit = finish(unit, user_unit, result.qtensors)
    weights.release_pages((user_unit, q_unit))   # a model larger than RAM: its mapped pages leave with the unit
    release_free_host_memory()

    if chain:   # the final loss pass computed the outputs, unless the unit fell back to other kernels
      out_q = result.outputs
      if out_q is None:
        out_q = recon.forward(unit, engine_placed(q_unit), x_q,
                              [acts[k.module][1] if k.module in acts else {} for k in unit.kernels])
      # In RAM the stores take over the arrays (two copies of the cache less at this point of the run).
      x_q = ActivationStore.holding([out_q.arrays[0]] + list(x_q.arrays[1:]), config.spill_dir,
                                     config.cache_dtype)
      x_fp = ActivationStore.holding([y_fp.arrays[0]] + list(x_fp.arrays[1:]), config.spill_dir,
                                      config.cache_dtype)
      out_q.close()
    else:
      x_q = x_fp = None
    y_fp.close()
    if ckpt is not None:
      cached = None if x_q is None else {'x_q': list(x_q.arrays), 'x_fp': list(x_fp.arrays)}
      ckpt.save(unit.index + 1, qtensors, report, cached)
  if ckpt is not None:
    ckpt.close()
  return tree_q, qtensors, report, states, acts, start_index


@functools.cache
def _malloc_trim():
  try:
    return ctypes.CDLL('libc.so.6').malloc_trim
  except (OSError, AttributeError):   # not glibc (macOS, musl): nothing to do
    return None


def release_free_host_memory() -> None:
  """Hands memory that is freed but still held by glibc's allocator back to the OS (``malloc_trim(0)``).

  glibc keeps freed heap chunks in per-thread arenas, and XLA's CPU threads allocate in their own, so memory freed
  in one phase is often not reused by the next: after planning a 7B-shaped Llama's 32 layers (the probe traces hold
  every layer's intermediate values) GiBs stayed resident with no live array left. With this call after planning
  and after each unit, one of its layers peaks at 7.8 instead of 9.4 GiB (benchmarks/bench_stream.py). A no-op
  without glibc.
  """
  trim = _malloc_trim()
  if trim is not None:
    trim(0)


def _acts_from_report(units: list[plan_lib.Unit], report: list[dict]) -> dict[str, tuple]:
  """The activation quantizers of restored units, their states rebuilt from the reports' exact JSON numbers."""
  out = {}
  for unit, rep in zip(units, report):
    saved = rep.get('activations', {})
    for i in unit.act_paths():
      module = unit.kernels[i].module
      if module not in saved:
        raise ValueError(f'checkpoint report of unit {unit.name} has no activation state for {module!r}')
      out[module] = (unit.acts[i], act_lib.state_from_json(saved[module]['state']))
  return out


def _user_placed(leaf) -> bool:
  return isinstance(getattr(leaf, 'sharding', None), jax.sharding.NamedSharding)


def _placed_like(fp_leaf, array):
  """``array`` with ``fp_leaf``'s sharding when the user placed ``fp_leaf`` with a ``NamedSharding`` (same
  shape): params that arrive sharded leave sharded, each device holding its part of the quantized model, not all
  of it. Anything else stays where the engine put it."""
  if _user_placed(fp_leaf) and np.shape(array) == np.shape(fp_leaf):
    return jax.device_put(array, fp_leaf.sharding)
  return array


class SpilledArrays:
  """Arrays moved out of host memory into files under a new ``quantized_*`` folder of ``spill_dir``, each read
  back as a read-only ``np.memmap`` (equal values, same dtype and shape). With ``spill_dir`` set, every finished
  unit's dequantized params and integer codes go there, so host memory does not grow with the number of units;
  the files stay after ``quantize`` returns (its result reads them): delete the folder when done with the result."""

  def __init__(self, spill_dir: str):
    os.makedirs(spill_dir, exist_ok=True)
    self.directory = tempfile.mkdtemp(prefix='quantized_', dir=spill_dir)

  def put(self, name: str, array) -> np.ndarray:
    array = np.asarray(array)
    if array.size == 0:
      return array
    path = os.path.join(self.directory, name.replace('/', '.') + '.bin')
    out = np.memmap(path, dtype=array.dtype, mode='w+', shape=array.shape)
    out[...] = array
    out.flush()
    del out
    return np.memmap(path, dtype=array.dtype, mode='r', shape=array.shape)

  def put_tree(self, prefix: str, tree):
    """``tree`` (same structure) with every array leaf spilled under ``prefix``."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: self.put(f'{prefix}/{treepath.path_str(treepath.path_names(kp))}', leaf), tree)
