"""``quantize``: block-wise reconstruction of any Flax model (the FlexRound / BRECQ procedure).

For each unit (a block matched by ``QuantConfig.blocks``, or a lone kernel layer outside every block), in forward
order:
  inputs   x_q: what the unit receives in the model whose earlier units are already quantized
           (optionally mixed element-wise with the float model's inputs x_fp, QDrop style)
  targets  y_fp: the float unit applied to x_fp
  train    the quantizer states of the unit's kernels, minimising mean(sum_features((unit_q(x) - y_fp)^2)) with
           optax Adam (cosine decay to 0 for FlexRound; AdaRound adds its annealed regulariser)
  freeze   finalize the unit's kernels to integer codes; the quantized model goes on with them.

Only the current unit's inputs and targets are held (host RAM, or memory-mapped files with ``spill_dir``).
When a unit's first input is exactly the previous unit's output (a chain: transformer layers, residual stages),
its inputs are propagated through the previous unit alone; otherwise the (partially quantized) model runs up
to the unit, stopping there.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flexround_jax import quantizers
from flexround_jax.engine import data as data_lib
from flexround_jax.engine import graph
from flexround_jax.engine.config import QuantConfig
from flexround_jax.qtensor import QTensor
from flexround_jax.spec import QuantSpec

log = logging.getLogger('flexround_jax')
TRACE_COUNTS: dict[str, int] = {'train_step': 0}   # incremented while tracing: counts compilations


@dataclasses.dataclass
class QuantizeResult:
  """What ``quantize`` returns.

  Attributes:
    params: same tree (and type) as the input params, every quantized kernel replaced by its dequantized value.
    qtensors: {'/'-joined kernel path: QTensor} for every quantized kernel (Dense-like kernels of rank > 2, e.g.
      DenseGeneral, are quantized as their 2-D (in, out) view; ``dequantize_params`` reshapes them back).
    report: per unit: name, kind, kernels, bits, loss_rtn (loss at the RTN start), loss_final (of the kept
      kernels), loss_trained (after training, before any fall-back), iters, seconds, fell_back_to_rtn,
      loss_curve ([step, mean training loss] pairs).
    plan: the units, kernels and sizes, as printed by ``dry_run``.
    states: with ``QuantConfig.keep_states``, the trained quantizer state of every kernel (FlexRound: log_s1..4),
      keyed like ``qtensors`` (units restored from a checkpoint have none).
  """

  params: Any
  qtensors: dict[str, QTensor]
  report: list[dict]
  plan: list[dict]
  config: QuantConfig
  states: dict[str, dict] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Unit:
  index: int
  name: str
  kind: str                           # 'block' | 'layer'
  call: graph.Call                    # probe call: apply function, signature, example inputs
  prefix: tuple                       # params keys of the unit's subtree
  kernels: list[graph.Kernel]
  specs: list[QuantSpec]
  treedef: Any                        # of (args, kwargs)
  batched: tuple[bool, ...]           # per leaf of (args, kwargs): batched array (else a constant)
  constants: tuple                    # leaf values where not batched
  chain_from_previous: bool = False
  _static_key: Any = None

  def rebuild(self, dyn_leaves):
    dyn = iter(dyn_leaves)
    leaves = [next(dyn) if b else c for b, c in zip(self.batched, self.constants)]
    args, kwargs = jax.tree.unflatten(self.treedef, leaves)
    return args, kwargs

  def rel(self, kernel: graph.Kernel) -> tuple:
    return kernel.param_path[len(self.prefix):]

  @property
  def static_key(self):
    """Hashable description of everything static in this unit's computation (the jit cache key)."""
    if self._static_key is None:
      consts = tuple(_hashable(c) for b, c in zip(self.batched, self.constants) if not b)
      self._static_key = (self.call.signature, str(self.treedef), self.batched, consts,
                          tuple((self.rel(k), k.shape, k.view_shape) for k in self.kernels), tuple(self.specs))
    return self._static_key


def _hashable(x):
  if isinstance(x, (np.ndarray, jax.Array)):
    return ('array', np.shape(x), str(np.asarray(x).dtype), hashlib.sha1(np.asarray(x).tobytes()).hexdigest())
  try:
    hash(x)
    return x
  except TypeError:
    return repr(x)


# ----------------------------------------------------------------------------------------------------- public ----

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
    raise ValueError(f'config must be a flexround_jax.QuantConfig, got {type(config).__name__}')
  if not callable(apply_fn):
    raise ValueError('apply_fn must be callable as apply_fn(params, batch)')
  is_nnx = isinstance(params, nnx.State)
  tree = nnx.to_pure_dict(params) if is_nnx else params
  _check_params(tree)
  user_structure = jax.tree.structure(params)

  def to_user(t):
    return jax.tree.unflatten(user_structure, jax.tree.leaves(t)) if is_nnx else t

  def model_fn(t, batch):
    return apply_fn(to_user(t), batch)

  calib = data_lib.as_arrays(calib_data)
  n = data_lib.num_samples(calib)
  units = _plan_units(model_fn, tree, calib, config)
  plan = _describe(units, n, config)
  if config.dry_run:
    _print_plan(plan, n, config)
    return QuantizeResult(params=params, qtensors={}, report=[], plan=plan, config=config)
  if config.method != 'rtn' and config.batch_size > n * jax.process_count():
    raise ValueError(f'QuantConfig.batch_size={config.batch_size} is larger than the {n} calibration samples')
  engine = _Engine(model_fn, tree, calib, units, config)
  tree_q, qtensors, report = engine.run()
  return QuantizeResult(params=to_user(tree_q), qtensors=qtensors, report=report, plan=plan, config=config,
                        states=engine.states)


def dequantize_params(params, qtensors: dict[str, QTensor]):
  """``params`` with each kernel named in ``qtensors`` replaced by ``qt.dequantize()`` (reshaped to the kernel)."""
  is_nnx = isinstance(params, nnx.State)
  tree = nnx.to_pure_dict(params) if is_nnx else params
  flat = {graph.path_str(tuple(graph._raw_key(k) for k in kp)): (tuple(graph._raw_key(k) for k in kp), leaf)
          for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  for name, qt in qtensors.items():
    if name not in flat:
      raise ValueError(f'qtensors names kernel {name!r}, which is not in params')
    keys, leaf = flat[name]
    tree = graph.set_leaf(tree, keys, qt.dequantize(jnp.asarray(leaf).dtype).reshape(np.shape(leaf)))
  return jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(tree)) if is_nnx else tree


# ----------------------------------------------------------------------------------------------------- checks ----

def _check_params(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not leaves:
    raise ValueError('params is empty')
  for kp, leaf in leaves:
    arr = np.asarray(leaf)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
      raise ValueError(f'params contain NaN or Inf at {jax.tree_util.keystr(kp)}')


def _plan_units(model_fn, tree, calib, config: QuantConfig) -> list[_Unit]:
  n = data_lib.num_samples(calib)
  probe_sizes = (1, 2) if n >= 2 else (1,)
  traces = []
  for size in probe_sizes:
    try:
      calls, _ = graph.trace_calls(model_fn, tree, data_lib.take(calib, np.arange(size)))
    except Exception as e:  # the user's model failing is reported before any long work
      raise ValueError(f'apply_fn(params, batch) failed on the first {size} calibration sample(s): '
                       f'{type(e).__name__}: {e}') from e
    traces.append(calls)
  calls = traces[-1]
  if not calls:
    raise ValueError('apply_fn called no Flax submodule: is it a Flax linen (module.apply) or nnx (nnx.merge) '
                     'model, run inside apply_fn?')
  kernels = graph.find_kernels(tree, calls, config.exclude)
  if not kernels:
    raise ValueError('params hold no quantizable kernel (a "kernel" leaf of rank >= 2 in a called module)')
  first_call = {}
  for c in calls:
    if c.path in first_call and c.path in {k.module for k in kernels}:
      raise ValueError(f'module {c.path!r} is called more than once per forward; shared weights are not supported')
    first_call.setdefault(c.path, c)

  block_paths = []
  if config.blocks is not None:
    block_paths = [c.path for c in calls if c.path and re.fullmatch(config.blocks, c.path)]
    block_paths = list(dict.fromkeys(block_paths))
    if not block_paths:
      seen = list(dict.fromkeys(c.path for c in calls if c.path))
      raise ValueError(f'QuantConfig.blocks={config.blocks!r} matches no module path (re.fullmatch). '
                       f'Module paths seen: {seen[:30]}{" ..." if len(seen) > 30 else ""}')
    for a in block_paths:
      for b in block_paths:
        if b.startswith(a + '/'):
          raise ValueError(f'QuantConfig.blocks={config.blocks!r} matches overlapping blocks {a!r} and {b!r}')

  groups: dict[str, list[graph.Kernel]] = {}
  for k in kernels:
    owner = next((b for b in block_paths if k.module == b or k.module.startswith(b + '/')), k.module)
    groups.setdefault(owner, []).append(k)

  small_calls = {c.path: c for c in traces[0]}
  units = []
  for owner, ks in sorted(groups.items(), key=lambda kv: first_call[kv[0]].index):
    call = first_call[owner]
    depth = len(owner.split('/'))
    prefix = ks[0].param_path[:depth]
    leaves, treedef = jax.tree.flatten((call.args, call.kwargs))
    small = jax.tree.leaves((small_calls[owner].args, small_calls[owner].kwargs))
    batched = tuple(
        hasattr(l, 'shape') and np.ndim(l) >= 1 and (len(probe_sizes) == 1 or np.shape(s)[0] != np.shape(l)[0])
        for l, s in zip(leaves, small))
    if not any(batched):
      raise ValueError(f'unit {owner!r} receives no array with the batch on axis 0; cannot cache its inputs')
    constants = tuple(None if b else (np.asarray(l) if hasattr(l, 'shape') else l) for l, b in zip(leaves, batched))
    units.append(_Unit(index=len(units), name=owner, kind='block' if owner in block_paths else 'layer', call=call,
                       prefix=prefix, kernels=ks, specs=[config.spec_for(k.module) for k in ks], treedef=treedef,
                       batched=batched, constants=constants))
  for prev, unit in zip(units, units[1:]):
    unit.chain_from_previous = _is_chain(prev, unit)
  return units


def _is_chain(prev: _Unit, unit: _Unit) -> bool:
  """True if ``unit``'s first batched input is exactly ``prev``'s output and its other inputs are ``prev``'s."""
  out = prev.call.output
  if not hasattr(out, 'shape'):
    return False
  cur = [l for l, b in zip(jax.tree.leaves((unit.call.args, unit.call.kwargs)), unit.batched) if b]
  before = [l for l, b in zip(jax.tree.leaves((prev.call.args, prev.call.kwargs)), prev.batched) if b]
  if np.shape(cur[0]) != np.shape(out) or not np.array_equal(np.asarray(cur[0]), np.asarray(out)):
    return False
  if len(cur) != len(before):
    return False
  return all(np.shape(a) == np.shape(b) and np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(cur[1:], before[1:]))


def _describe(units: list[_Unit], n: int, config: QuantConfig) -> list[dict]:
  plan = []
  for u in units:
    dyn = [l for l, b in zip(jax.tree.leaves((u.call.args, u.call.kwargs)), u.batched) if b]
    per_sample_in = sum(np.asarray(l)[0].nbytes for l in dyn)
    per_sample_out = sum(np.asarray(l)[0].nbytes for l in jax.tree.leaves(u.call.output))
    copies = 2 if config.drop_prob > 0 else 1
    plan.append({
        'unit': u.name, 'kind': u.kind,
        'kernels': [graph.path_str(k.param_path) for k in u.kernels],
        'bits': [s.bits for s in u.specs],
        'params': int(sum(math.prod(k.shape) for k in u.kernels)),
        'activation_bytes': int(n * (per_sample_in * (1 + copies) + per_sample_out)),
        'inputs_from': 'previous unit' if u.chain_from_previous else 'model forward',
    })
  return plan


def _print_plan(plan, n, config):
  lines = [f'flexround_jax plan: method={config.method}, {len(plan)} units, {n} calibration samples, '
           f'{config.iters} iters x batch {config.batch_size}']
  for p in plan:
    lines.append(f"  [{p['kind']:5s}] {p['unit']:40s} {len(p['kernels']):3d} kernels  {p['params']:>11,d} weights  "
                 f"bits {sorted(set(p['bits']))}  activations {p['activation_bytes'] / 2**20:8.1f} MiB  "
                 f"inputs: {p['inputs_from']}")
  peak = max(p['activation_bytes'] for p in plan)
  lines.append(f'  peak activation cache (one unit at a time): {peak / 2**20:.1f} MiB')
  print('\n'.join(lines))


# ----------------------------------------------------------------------------------------------------- engine ----

class _Engine:

  def __init__(self, model_fn, tree, calib, units: list[_Unit], config: QuantConfig):
    self.model_fn = model_fn
    self.fp_tree = tree
    self.calib = calib
    self.units = units
    self.config = config
    self.method = quantizers.METHODS[config.method]
    self.n = data_lib.num_samples(calib)
    self.mesh, self.local_mesh = _meshes(config)
    self.n_local_dev = self.local_mesh.devices.size
    self.eval_bs = max(self.n_local_dev, (config.eval_batch_size // self.n_local_dev) * self.n_local_dev)
    self.log_file = None
    log_dir = config.log_dir or config.checkpoint_dir
    if log_dir:
      os.makedirs(log_dir, exist_ok=True)
      self.log_file = os.path.join(os.path.abspath(log_dir), 'quantize_log.jsonl')
    self.states: dict[str, dict] = {}
    self.ckpt = None
    if config.checkpoint_dir:
      from flexround_jax.engine import checkpoint  # pylint: disable=g-import-not-at-top
      if jax.process_count() > 1:
        raise ValueError('QuantConfig.checkpoint_dir is not supported in multi-process runs yet')
      self.ckpt = checkpoint.Checkpointer(config.checkpoint_dir, _fingerprint(tree, calib, config))

  # -- logging --
  def _log(self, **record):
    if self.log_file and jax.process_index() == 0:
      with open(self.log_file, 'a') as f:
        f.write(json.dumps({'time': time.time(), **record}) + '\n')
        f.flush()

  # -- chunked forwards on local devices --
  def _put_local(self, tree):
    sharding = NamedSharding(self.local_mesh, P('data'))
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)

  def _map(self, fn, tree, inputs, store: data_lib.ActivationStore):
    for start, n_valid, chunk in data_lib.chunks(inputs, self.eval_bs):
      out = fn(tree, self._put_local(chunk))
      store.write(start, n_valid, [np.asarray(o) for o in jax.tree.leaves(out)])
    return store

  @functools.lru_cache(maxsize=None)
  def _inputs_fn(self, unit_name: str, unit_index: int):
    unit = self.units[unit_index]

    def fn(tree, batch):
      args, kwargs = graph.inputs_of(self.model_fn, tree, batch, unit_name)
      return [l for l, b in zip(jax.tree.leaves((args, kwargs)), unit.batched) if b]
    return jax.jit(fn)

  def _unit_inputs(self, unit: _Unit, tree) -> data_lib.ActivationStore:
    store = data_lib.ActivationStore(self.n, self.config.spill_dir)
    return self._map(self._inputs_fn(unit.name, unit.index), tree, self.calib, store)

  def _unit_forward(self, unit: _Unit, unit_params, x: data_lib.ActivationStore) -> data_lib.ActivationStore:
    fwd = _forward_fn(unit.static_key, unit)
    store = data_lib.ActivationStore(self.n, self.config.spill_dir)
    return self._map(lambda p, dyn: fwd(p, dyn), unit_params, list(x.arrays), store)

  # -- the loop --
  def run(self):
    cfg = self.config
    tree_q = self.fp_tree
    qtensors: dict[str, QTensor] = {}
    report: list[dict] = []
    start_index, x_q, x_fp = 0, None, None
    if self.ckpt is not None:
      restored = self.ckpt.restore(self.units)
      if restored is not None:
        start_index, qtensors, report, acts = restored
        tree_q = dequantize_params(self.fp_tree, qtensors)
        if acts is not None:
          x_q = data_lib.ActivationStore.from_arrays(acts['x_q'], cfg.spill_dir)
          x_fp = data_lib.ActivationStore.from_arrays(acts['x_fp'], cfg.spill_dir)
        print(f'flexround_jax: resuming from {cfg.checkpoint_dir} at unit {start_index}/{len(self.units)}')
        self._log(event='resume', unit_index=start_index)

    for unit in self.units[start_index:]:
      t0 = time.time()
      if x_q is None:
        x_q = self._unit_inputs(unit, tree_q)
        x_fp = self._unit_inputs(unit, self.fp_tree)
      fp_unit = graph.get_subtree(self.fp_tree, unit.prefix)
      y_fp = self._unit_forward(unit, fp_unit, x_fp)
      self._log(event='unit_start', unit=unit.name, index=unit.index)
      unit_qts, unit_report = self._reconstruct(unit, fp_unit, x_q, x_fp, y_fp)
      unit_report['seconds'] = round(time.time() - t0, 3)
      report.append(unit_report)
      self._log(event='unit_end', **unit_report)
      qtensors.update(unit_qts)
      q_unit = dequantize_params(fp_unit, {graph.path_str(unit.rel(k)): unit_qts[graph.path_str(k.param_path)]
                                           for k in unit.kernels})
      tree_q = _set_subtree(tree_q, unit.prefix, q_unit)

      nxt = self.units[unit.index + 1] if unit.index + 1 < len(self.units) else None
      if nxt is not None and nxt.chain_from_previous:
        out_q = self._unit_forward(unit, q_unit, x_q)
        x_q = data_lib.ActivationStore.from_arrays([out_q.arrays[0]] + list(x_q.arrays[1:]), cfg.spill_dir)
        x_fp = data_lib.ActivationStore.from_arrays([y_fp.arrays[0]] + list(x_fp.arrays[1:]), cfg.spill_dir)
        out_q.close()
      else:
        x_q = x_fp = None
      y_fp.close()
      if self.ckpt is not None:
        acts = None if x_q is None else {'x_q': list(x_q.arrays), 'x_fp': list(x_fp.arrays)}
        self.ckpt.save(unit.index + 1, qtensors, report, acts)
    if self.ckpt is not None:
      self.ckpt.close()
    return tree_q, qtensors, report

  def _reconstruct(self, unit: _Unit, fp_unit, x_q, x_fp, y_fp):
    cfg = self.config
    views = [jnp.asarray(graph.get_subtree(fp_unit, unit.rel(k))).reshape(k.view_shape) for k in unit.kernels]
    rtn_states = [quantizers.rtn.init(v, s) for v, s in zip(views, unit.specs)]
    rtn_qts = [quantizers.rtn.finalize(v, st, s) for v, st, s in zip(views, rtn_states, unit.specs)]
    loss_rtn = self._eval_loss(unit, fp_unit, rtn_qts, x_q, y_fp)
    iters = cfg.iters if cfg.method != 'rtn' else 0
    qts, curve, states = rtn_qts, [], rtn_states
    if iters > 0:
      states = [self.method.init(v, s) for v, s in zip(views, unit.specs)]
      states, curve = self._train(unit, fp_unit, states, x_q, x_fp, y_fp, iters)
      qts = [self.method.finalize(v, st, s) for v, st, s in zip(views, states, unit.specs)]
    loss_final = self._eval_loss(unit, fp_unit, qts, x_q, y_fp) if iters > 0 else loss_rtn
    loss_trained, fell_back = loss_final, False
    if iters > 0 and cfg.fallback_to_rtn and not loss_final <= loss_rtn:
      warnings.warn(f'unit {unit.name}: {cfg.method} ended at loss {loss_final:.6g}, worse than its RTN start '
                    f'{loss_rtn:.6g}; keeping RTN for this unit')
      qts, loss_final, fell_back = rtn_qts, loss_rtn, True
    names = [graph.path_str(k.param_path) for k in unit.kernels]
    rep = {'unit': unit.name, 'kind': unit.kind, 'kernels': len(unit.kernels),
           'bits': sorted({s.bits for s in unit.specs}), 'loss_rtn': loss_rtn, 'loss_final': loss_final,
           'loss_trained': loss_trained, 'iters': iters, 'fell_back_to_rtn': fell_back, 'loss_curve': curve}
    if cfg.keep_states:
      self.states.update({n: jax.device_get(st) for n, st in zip(names, states)})
    return dict(zip(names, qts)), rep

  def _eval_loss(self, unit: _Unit, fp_unit, qts, x: data_lib.ActivationStore, y: data_lib.ActivationStore):
    params = _with_kernels(fp_unit, unit, [qt.dequantize() for qt in qts])
    fn = _loss_eval_fn(unit.static_key, unit)
    total = 0.0
    for start, n_valid, chunk in data_lib.chunks(list(x.arrays) + list(y.arrays), self.eval_bs):
      chunk = self._put_local(chunk)
      per_sample = np.asarray(fn(params, chunk[:len(x.arrays)], chunk[len(x.arrays):]))
      total += float(per_sample[:n_valid].astype(np.float64).sum())
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      total = float(np.sum(multihost_utils.process_allgather(np.float64(total))))
    return total / (self.n * jax.process_count())

  def _train(self, unit: _Unit, fp_unit, states, x_q, x_fp, y_fp, iters):
    cfg = self.config
    trainable = [{k: v for k, v in st.items() if k in self.method.TRAINABLE} for st in states]
    frozen = [{k: v for k, v in st.items() if k not in self.method.TRAINABLE} for st in states]
    opt_key = (cfg.method, cfg.learning_rate, cfg.lr_s1, iters)
    opt = _optimizer(*opt_key)
    repl = NamedSharding(self.mesh, P())
    trainable, frozen, unit_params = jax.device_put((trainable, frozen, fp_unit), repl)
    opt_state = jax.device_put(opt.init(trainable), repl)
    step = _train_step_fn(unit.static_key, unit, opt_key, float(cfg.drop_prob))
    sampler = _Sampler(self.n, cfg, unit.index)
    key = jax.random.fold_in(jax.random.key(cfg.seed), unit.index)
    warm = int(cfg.adaround_warmup * iters)
    beta0, beta1 = cfg.adaround_beta
    bar = _progress(iters, unit, cfg)
    every = max(1, min(50, iters // 20))
    recent, curve = [], []
    for i in range(iters):
      idx = sampler(i)
      x_batch = [a[idx] for a in x_q.arrays]
      x0_fp = x_fp.arrays[0][idx] if cfg.drop_prob > 0 else np.zeros((), np.float32)
      y_batch = [a[idx] for a in y_fp.arrays]
      x_batch, y_batch, x0_fp = self._put_global((x_batch, y_batch, x0_fp), cfg.drop_prob > 0)
      rel = 0.0 if i < warm else (i - warm) / max(1, iters - warm)
      beta = beta0 + (beta1 - beta0) * rel          # linear, as BRECQ's LinearTempDecay
      lam = 0.0 if i < warm else cfg.adaround_lambda
      trainable, opt_state, loss = step(trainable, opt_state, frozen, unit_params, x_batch, y_batch, x0_fp,
                                        jax.random.fold_in(key, i), jnp.float32(beta), jnp.float32(lam))
      recent.append(loss)
      if (i + 1) % every == 0 or i + 1 == iters:
        value = float(np.mean([float(l) for l in recent]))
        recent = []
        curve.append([i + 1, value])
        if bar is not None:
          bar.set_postfix(loss=f'{value:.4g}')
          bar.update(every if (i + 1) % every == 0 else (i + 1) % every)
        if (i + 1) % (every * 5) == 0 or i + 1 == iters:
          self._log(event='step', unit=unit.name, step=i + 1, loss=value)
    if bar is not None:
      bar.close()
    trainable, frozen = jax.device_get((trainable, frozen))
    return [{**f, **t} for t, f in zip(trainable, frozen)], curve

  def _put_global(self, tree, with_fp):
    x_batch, y_batch, x0_fp = tree
    if jax.process_count() == 1:
      sharding = NamedSharding(self.mesh, P('data'))
      put = lambda a: jax.device_put(a, sharding)
      return ([put(a) for a in x_batch], [put(a) for a in y_batch],
              put(x0_fp) if with_fp else jax.device_put(x0_fp, NamedSharding(self.mesh, P())))
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    glob = lambda a: multihost_utils.host_local_array_to_global_array(a, self.mesh, P('data'))
    return ([glob(a) for a in x_batch], [glob(a) for a in y_batch],
            glob(x0_fp) if with_fp else multihost_utils.host_local_array_to_global_array(x0_fp, self.mesh, P()))


class _Sampler:
  """Seeded, stratified minibatch indices into this process's calibration samples.

  The global calibration set is split into ``shards`` equal contiguous parts (each process holds
  shards / process_count of them); every step draws batch_size / shards samples from each part, with a generator
  seeded by (seed, unit, part), so the global minibatch does not depend on how the parts are spread over processes.
  """

  def __init__(self, n_local: int, config: QuantConfig, unit_index: int):
    procs = jax.process_count()
    shards = config.sample_shards or procs
    if shards % procs or config.batch_size % shards:
      raise ValueError(f'QuantConfig.sample_shards={shards} must be a multiple of the {procs} processes and divide '
                       f'batch_size={config.batch_size}')
    local = shards // procs
    if n_local % local:
      raise ValueError(f'the {n_local} calibration samples of this process do not split into {local} equal parts '
                       f'(QuantConfig.sample_shards={shards})')
    self.part, self.b = n_local // local, config.batch_size // shards
    first = jax.process_index() * local
    self.rngs = [np.random.default_rng([config.seed, unit_index, first + j]) for j in range(local)]
    self.replace = self.b > self.part

  def __call__(self, step):
    return np.concatenate([j * self.part + np.sort(rng.choice(self.part, self.b, replace=self.replace))
                           for j, rng in enumerate(self.rngs)])


def _meshes(config: QuantConfig):
  devices = jax.devices()
  local = jax.local_devices()
  n_local = len(local) if config.num_devices is None else min(config.num_devices, len(local))
  per_proc_batch = config.batch_size // max(1, jax.process_count())
  while per_proc_batch % n_local:   # the batch must split evenly over the devices
    n_local -= 1
  local = local[:n_local]
  if jax.process_count() == 1:
    mesh = jax.sharding.Mesh(np.array(local), ('data',))
    return mesh, mesh
  by_proc = {}
  for d in devices:
    by_proc.setdefault(d.process_index, []).append(d)
  chosen = [d for p in sorted(by_proc) for d in by_proc[p][:n_local]]
  return jax.sharding.Mesh(np.array(chosen), ('data',)), jax.sharding.Mesh(np.array(local), ('data',))


def _optimizer(method: str, lr: float, lr_s1: float | None, iters: int):
  """AdaRound: Adam at a constant rate (BRECQ). FlexRound: Adam with cosine decay to 0 (official code), optionally
  with its own rate for log_s1."""
  if method == 'adaround':
    return optax.adam(lr)
  sched = lambda rate: optax.cosine_decay_schedule(rate, iters, alpha=0.0)
  if lr_s1 is None:
    return optax.adam(sched(lr))
  labels = lambda tr: [{k: ('s1' if k == 'log_s1' else 'rest') for k in st} for st in tr]
  return optax.multi_transform({'s1': optax.adam(sched(lr_s1)), 'rest': optax.adam(sched(lr))}, labels)


def _progress(iters, unit, cfg):
  if not cfg.progress or jax.process_index() != 0:
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=iters, desc=f'{cfg.method} {unit.name}', unit='it', leave=True, dynamic_ncols=True)


# -------------------------------------------------------------------------------------- jitted unit functions ----
# Cached on the unit's static key, so identical blocks (same module definition, shapes and specs) compile once.

def _with_kernels(unit_params, unit: _Unit, kernels_hat):
  for k, w in zip(unit.kernels, kernels_hat):
    unit_params = graph.set_leaf(unit_params, unit.rel(k), jnp.reshape(w, k.shape))
  return unit_params


def _set_subtree(tree, prefix, sub):
  return graph.set_leaf(tree, tuple(prefix), sub)


def _per_sample_loss(out, y_leaves):
  total = 0.0
  for o, y in zip(jax.tree.leaves(out), y_leaves):
    d = (o.astype(jnp.float32) - y.astype(jnp.float32)) ** 2
    d = jnp.sum(d, axis=-1) if d.ndim > 1 else d
    total = total + d.reshape(d.shape[0], -1).mean(axis=1)
  return total


@functools.lru_cache(maxsize=None)
def _forward_fn_cached(static_key, unit_ref):
  unit = unit_ref.unit

  def fwd(params, dyn):
    args, kwargs = unit.rebuild(dyn)
    return unit.call.apply(params, *args, **kwargs)
  return jax.jit(fwd)


class _Ref:
  """Carries a unit into an lru_cache without making it part of the key."""

  def __init__(self, unit):
    self.unit = unit

  def __hash__(self):
    return 0

  def __eq__(self, other):
    return isinstance(other, _Ref)


def _forward_fn(static_key, unit):
  return _forward_fn_cached(static_key, _Ref(unit))


def _loss_eval_fn(static_key, unit):
  return _loss_eval_cached(static_key, _Ref(unit))


@functools.lru_cache(maxsize=None)
def _loss_eval_cached(static_key, unit_ref):
  unit = unit_ref.unit

  def fn(params, dyn, y):
    args, kwargs = unit.rebuild(dyn)
    return _per_sample_loss(unit.call.apply(params, *args, **kwargs), y)
  return jax.jit(fn)


def _train_step_fn(static_key, unit, opt_key, drop_prob):
  return _train_step_cached(static_key, _Ref(unit), opt_key, drop_prob)


@functools.lru_cache(maxsize=None)
def _train_step_cached(static_key, unit_ref, opt_key, drop_prob):
  unit = unit_ref.unit
  method_name = opt_key[0]
  method = quantizers.METHODS[method_name]
  opt = _optimizer(*opt_key)

  def loss_fn(trainable, frozen, unit_params, x, y, x0_fp, key, beta, lam):
    kernels_hat, reg = [], 0.0
    for k, spec, t, f in zip(unit.kernels, unit.specs, trainable, frozen):
      view = jnp.reshape(graph.get_subtree(unit_params, unit.rel(k)), k.view_shape)
      state = {**f, **t}
      kernels_hat.append(method.fake_quant(view, state, spec))
      if method_name == 'adaround':
        reg = reg + method.regularizer(state, beta)
    params = _with_kernels(unit_params, unit, kernels_hat)
    if drop_prob > 0:
      keep_q = jax.random.uniform(key, x[0].shape) >= drop_prob
      x = [jnp.where(keep_q, x[0], x0_fp)] + list(x[1:])
    args, kwargs = unit.rebuild(x)
    rec = jnp.mean(_per_sample_loss(unit.call.apply(params, *args, **kwargs), y))
    return rec + lam * reg

  def step(trainable, opt_state, frozen, unit_params, x, y, x0_fp, key, beta, lam):
    TRACE_COUNTS['train_step'] += 1
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, unit_params, x, y, x0_fp, key, beta, lam)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


# ------------------------------------------------------------------------------------------------ fingerprint ----

def _fingerprint(tree, calib, config: QuantConfig) -> str:
  h = hashlib.sha256()
  h.update(json.dumps(config.fingerprint_fields(), sort_keys=True, default=str).encode())
  for name, t in (('params', tree), ('calib', calib)):
    h.update(name.encode())
    for kp, leaf in jax.tree_util.tree_flatten_with_path(t)[0]:
      arr = np.ascontiguousarray(np.asarray(leaf))
      h.update(jax.tree_util.keystr(kp).encode() + str(arr.shape).encode() + str(arr.dtype).encode())
      h.update(arr.tobytes())
  h.update(str(jax.process_count()).encode())
  return h.hexdigest()
