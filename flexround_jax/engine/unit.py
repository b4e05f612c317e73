"""Reconstructing one unit: its compiled functions, closed-form solves, the optax loop, and the RTN comparison.

For a unit with cached inputs x_q (quantized model), x_fp (float model) and float targets y_fp
(``UnitReconstructor.reconstruct``, one method per step):
  1. ``baseline``: the unit's baseline Method (RTN) on every kernel, and its block loss (the start every method is
     compared with; with ``QuantConfig.fallback_samples``, on that fixed subset of the samples alone).
  2. ``solve``: kernels whose method solves in closed form (GPTQ) are solved one by one in call order, each from the
     Hessian of its own inputs in the unit whose earlier kernels are already solved ("true sequential");
     ``closed_form_start``: the loss of that start, when the unit trains from it.
  3. ``train``: kernels whose method is gradient-trained are trained jointly: ``iters`` steps of
     ``mean(sum_features((unit_q(x) - y_fp)^2)) + sum of the methods' penalties``, each kernel's state updated by
     its method's optax transformation.
  4. ``candidate``: every kernel is finalized to a QTensor, and ``choose`` picks what the unit keeps: a non-finite
     result never; with ``fallback_to_rtn``, a unit trained from a closed-form start that ends worse than that
     start keeps the start, and a unit that ends worse than RTN keeps RTN (each compared on the same samples). The
     trained kernels' loss on every sample comes from the pass that writes the unit's outputs (the next unit's
     inputs). ``report`` and ``result`` record it.

Compiled functions live in a ``Compiled`` cache owned by one ``quantize`` call and keyed by the unit's static
key, so identical blocks compile once and nothing outlives the call.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import treepath, weights
from . import activations, graph, precision
from .activations import ActivationStore, Placement
from .config import QuantConfig
from .plan import Unit, relative_module
from ..quantizers import activation as act_lib
from ..qtensor import QTensor


def per_sample_loss(out, y_leaves):
  """Per sample: sum over the feature (last) axis of the squared error, mean over the other axes, summed over
  output leaves."""
  total = 0.0
  for o, y in zip(jax.tree.leaves(out), y_leaves):
    d = (o.astype(jnp.float32) - y.astype(jnp.float32)) ** 2
    d = jnp.sum(d, axis=-1) if d.ndim > 1 else d
    total = total + d.reshape(d.shape[0], -1).mean(axis=1)
  return total


def with_kernels(unit_params, unit: Unit, kernels_hat):
  """``unit_params`` with each of the unit's kernels replaced (views laid back out as the kernel)."""
  for k, w in zip(unit.kernels, kernels_hat):
    unit_params = treepath.set_leaf(unit_params, unit.rel(k), k.from_view(w))
  return unit_params


def kernel_views(unit: Unit, unit_params) -> list[jax.Array]:
  """The unit's kernels as the quantizers see them (Dense (in, out), Conv (..., in_per_group, out))."""
  return [k.to_view(jnp.asarray(treepath.get_subtree(unit_params, unit.rel(k)))) for k in unit.kernels]


def act_fns(unit: Unit, act_states, key=None, drop_prob: float = 0.0) -> dict:
  """{module path in the unit: fn} quantizing the inputs of the unit's kernels that have an activation quantizer;
  with ``key`` and ``drop_prob > 0``, QDrop: each element stays unquantized with probability ``drop_prob`` (a fresh
  mask per quantizer, from ``fold_in(key, 1 + kernel index)``)."""
  fns = {}
  for i, path in unit.act_paths().items():
    def fn(x, q=unit.acts[i], st=act_states[i], i=i):
      x_hat = q.fake_quant(x, st)
      if key is not None and drop_prob > 0:
        keep_q = jax.random.uniform(jax.random.fold_in(key, 1 + i), x.shape) >= drop_prob
        x_hat = jnp.where(keep_q, x_hat, x)
      return x_hat
    fns[path] = fn
  return fns


def apply_unit(unit: Unit, params, dyn, act_states=None, key=None, drop_prob: float = 0.0):
  """The unit's forward; with ``act_states`` (per kernel), its kernels' inputs quantized (see ``act_fns``)."""
  if act_states is None or not unit.act_paths():
    return unit.apply(params, dyn)
  with graph.map_inputs(act_fns(unit, act_states, key, drop_prob)):
    return unit.apply(params, dyn)


def _pair(tx_w, tx_a):
  """One optax transformation over (weight trainables, activation trainables), each part by its own."""
  def init(params):
    return tx_w.init(params[0]), tx_a.init(params[1])

  def update(updates, state, params=None):
    uw, sw = tx_w.update(updates[0], state[0], None if params is None else params[0])
    ua, sa = tx_a.update(updates[1], state[1], None if params is None else params[1])
    return (uw, ua), (sw, sa)
  return optax.GradientTransformation(init, update)


def _by_kernel(owners: list, iters: int):
  """The optax transformation over a list of per-kernel trainable dicts whose kernel ``i`` is trained by
  ``owners[i].optimizer`` (None: frozen): one owner's transformation itself, several: ``optax.multi_transform`` by
  kernel, none: nothing moves."""
  trained = [o for o in dict.fromkeys(o for o in owners if o is not None) if o.optimizer is not None]
  if len(trained) == 1:
    return trained[0].optimizer(iters)
  if not trained:
    return optax.set_to_zero()
  label_of = {o: f'm{i}' for i, o in enumerate(trained)}
  txs = {label_of[o]: o.optimizer(iters) for o in trained}
  txs['frozen'] = optax.set_to_zero()
  labels = [label_of.get(o, 'frozen') for o in owners]
  return optax.multi_transform(txs, lambda tr: [{k: labels[i] for k in st} for i, st in enumerate(tr)])


def split_acts(unit: Unit, act_states) -> tuple[list, list]:
  """(trainable, frozen) lists, per kernel, of the activation quantizers' states."""
  train, frozen = [], []
  for q, st in zip(unit.acts or [None] * len(unit.kernels), act_states):
    keys = q.trainable if q is not None else ()
    train.append({k: v for k, v in st.items() if k in keys})
    frozen.append({k: v for k, v in st.items() if k not in keys})
  return train, frozen


def _mix_inputs(x, x0_fp, key, drop_prob):
  """QDrop: each element of the first input is the float model's with probability ``drop_prob``."""
  keep_q = jax.random.uniform(key, x[0].shape) >= drop_prob
  return [jnp.where(keep_q, x[0], x0_fp)] + list(x[1:])


def make_optimizer(unit: Unit, iters: int):
  """One optax transformation over the list of per-kernel trainable dicts: each kernel's method's own (one method:
  that method's transformation itself; several: ``optax.multi_transform`` by kernel). A unit with quantized kernel
  inputs trains the pair (weight trainables, activation trainables), the latter by the activation quantizers' own
  transformations."""
  tx_w = _by_kernel([m if m.trains else None for m in unit.methods], iters)
  return _pair(tx_w, _by_kernel(list(unit.acts), iters)) if unit.act_paths() else tx_w


def state_shapes(unit: Unit, unit_params, iters: int):
  """(params, trainable, frozen, optimizer state) of training ``unit`` as ``jax.ShapeDtypeStruct`` trees, from
  shapes alone (abstract evaluation, nothing computed or read): the kernels' method states from ``init`` (a
  closed-form method without ``init`` contributes empty dicts), no optimizer state when ``iters`` is 0."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.dtype(x.dtype)), unit_params)
  shaped = [m.init is not None for m in unit.methods]

  def states(params):
    views = kernel_views(unit, params)
    split = [m.split(m.init(v, s)) if ok else ({}, {})
             for v, m, s, ok in zip(views, unit.methods, unit.specs, shaped)]
    trainable = [t for t, _ in split]
    if iters == 0:   # nothing trains: no optimizer state
      return trainable, [f for _, f in split], ()
    tx = _by_kernel([m if m.trains and ok else None for m, ok in zip(unit.methods, shaped)], iters)
    return trainable, [f for _, f in split], tx.init(trainable)
  return (abstract,) + tuple(jax.eval_shape(states, abstract))


def state_bytes(unit: Unit, unit_params, iters: int, model_devices: int = 1) -> tuple[int, bool]:
  """(bytes on one device, exact?) of what training ``unit`` holds besides minibatches (``state_shapes``), as
  ``UnitReconstructor.train`` places them (``Placement.state``: an array whose last axis splits over
  ``model_devices`` counts that fraction). Closed-form methods' states need the data (no ``init``); they are left
  out and the count is flagged inexact. Activation-quantizer steps (scalars) are left out."""
  def per_device(x):
    split = model_devices > 1 and len(x.shape) >= 2 and x.shape[-1] % model_devices == 0
    return x.size * x.dtype.itemsize // (model_devices if split else 1)
  total = sum(per_device(x) for x in jax.tree.leaves(state_shapes(unit, unit_params, iters)))
  return int(total), all(m.init is not None for m in unit.methods)


def make_train_step(unit: Unit, iters: int, drop_prob: float, compute_dtype: str = 'float32') -> tuple[Callable, Any]:
  """(jitted K-step function, optimizer) for ``unit``: several optax steps per dispatch, their matmuls and
  convolutions (forward and backward) in ``compute_dtype`` (``precision.cast_matmuls``; QuantConfig.compute_dtype).

  ``steps(trainable, opt_state, frozen, unit_params, xs, ys, x0s, key, first) -> (trainable, opt_state, losses)``
  runs K = ``len(ys[0])`` steps (K > 1: one ``lax.scan``): step ``k`` trains on the minibatch ``xs[j][k]`` /
  ``ys[j][k]`` (``x0s[k]``: the float model's first input, used when ``drop_prob > 0``; any (K,) array otherwise),
  with PRNG key ``fold_in(key, first + k)`` and schedule step ``first + k``. Each K compiles once (the engine uses
  one K per unit plus the remainder of ``iters``). ``trainable`` / ``frozen`` are lists of per-kernel dicts
  (``Method.split``), or for a unit with quantized kernel inputs the pairs (those lists, ``split_acts`` lists); the
  buffers of ``trainable`` and ``opt_state`` are donated. Step k computes what a one-step
  call with the same minibatch, key and step index computes (tests/test_engine.py).
  """
  opt = make_optimizer(unit, iters)
  penalized = [m for m in dict.fromkeys(unit.methods) if m.penalty is not None]
  has_acts = bool(unit.act_paths())

  def loss_fn(trainable, frozen, unit_params, x, y, x0_fp, key, step_index):
    views = kernel_views(unit, unit_params)
    act_states = None
    if has_acts:   # ((weight trainables, act trainables), (weight frozen, act frozen))
      act_states = [{**f, **t} for t, f in zip(trainable[1], frozen[1])]
      trainable, frozen = trainable[0], frozen[0]
    states = [{**f, **t} for t, f in zip(trainable, frozen)]
    kernels_hat = [m.fake_quant(v, st, spec, step_index, iters)
                   for m, v, st, spec in zip(unit.methods, views, states, unit.specs)]
    params = with_kernels(unit_params, unit, kernels_hat)
    if drop_prob > 0:
      x = _mix_inputs(x, x0_fp, key, drop_prob)
    loss = jnp.mean(per_sample_loss(apply_unit(unit, params, x, act_states, key, drop_prob), y))
    for m in penalized:
      loss = loss + m.penalty([st for st, mk in zip(states, unit.methods) if mk is m], step_index, iters)
    return loss

  def one_step(trainable, opt_state, frozen, unit_params, x, y, x0_fp, key, step_index):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, unit_params, x, y, x0_fp,
                                              jax.random.fold_in(key, step_index), step_index)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  def steps(trainable, opt_state, frozen, unit_params, xs, ys, x0s, key, first):
    if len(ys[0]) == 1:   # one step per dispatch: no loop around it (see steps_per_dispatch)
      trainable, opt_state, loss = one_step(trainable, opt_state, frozen, unit_params, [a[0] for a in xs],
                                            [a[0] for a in ys], x0s[0], key, first)
      return trainable, opt_state, loss[None]

    def body(carry, batch):
      k, x, y, x0_fp = batch
      trainable, opt_state, loss = one_step(*carry, frozen, unit_params, x, y, x0_fp, key, first + k)
      return (trainable, opt_state), loss

    k = jnp.arange(len(ys[0]), dtype=jnp.int32)
    (trainable, opt_state), losses = jax.lax.scan(body, (trainable, opt_state), (k, xs, ys, x0s))
    return trainable, opt_state, losses

  return jax.jit(precision.cast_matmuls(steps, compute_dtype), donate_argnums=(0, 1)), opt


class Compiled:
  """Compiled functions of one ``quantize`` call, keyed by the units' static keys (identical blocks share them)."""

  def __init__(self):
    self._fns: dict = {}

  def _get(self, key, build):
    new = key not in self._fns
    if new:
      self._fns[key] = build()
    return self._fns[key], new

  def forward(self, unit: Unit, acts: bool = False):
    """jitted ``(params, dyn) -> output`` (``acts``: ``((params, act_states), dyn)``, kernel inputs quantized)."""
    if not acts:
      return self._get(('forward', unit.static_key), lambda: jax.jit(unit.apply))[0]
    return self._get(('forward_acts', unit.static_key),
                     lambda: jax.jit(lambda pa, dyn: apply_unit(unit, pa[0], dyn, pa[1])))[0]

  def kernel_inputs(self, unit: Unit, indices: tuple):
    """jitted ``(params, dyn) -> [input of kernel i's module for i in indices]`` (float, as they arrive)."""
    def fn(params, dyn):
      got = {}

      def keep(path):
        def f(x):
          got[path] = x
          return x
        return f
      paths = unit.act_paths()
      with graph.map_inputs({paths[i]: keep(paths[i]) for i in indices}):
        unit.apply(params, dyn)
      return [got[paths[i]] for i in indices]
    return self._get(('kernel_inputs', unit.static_key, indices), lambda: jax.jit(fn))[0]

  def loss_eval(self, unit: Unit, with_outputs: bool = False):
    """jitted ``(params, dyn, y, act_states) -> per-sample loss`` (``with_outputs``: ``(loss, output leaves)``)."""
    def fn(params, dyn, y, act_states):
      out = apply_unit(unit, params, dyn, act_states)
      loss = per_sample_loss(out, y)
      return (loss, jax.tree.leaves(out)) if with_outputs else loss
    return self._get(('loss', unit.static_key, with_outputs), lambda: jax.jit(fn))[0]

  def train_step(self, unit: Unit, iters: int, drop_prob: float, compute_dtype: str = 'float32'):
    """((step, optimizer), newly built?)"""
    return self._get(('train', unit.static_key, iters, drop_prob, compute_dtype),
                     lambda: make_train_step(unit, iters, drop_prob, compute_dtype))

  def hessian(self, unit: Unit, index: int):
    return self._get(('hessian', unit.static_key, index), lambda: _hessian_fn(unit, index))[0]


def _hessian_fn(unit: Unit, index: int):   # the kernel's module must take its input as the first positional arg
  """jitted ``(params, dyn, valid) -> (sum of x x^T, rows)`` over the input rows x of kernel ``index`` of the valid
  samples (``valid``: 1 / 0 per sample of the chunk; padded samples count 0)."""
  kernel = unit.kernels[index]
  n_in = kernel.view_shape[0]
  path = relative_module(unit, kernel.module)

  def fn(params, dyn, valid):
    args, _ = graph.inputs_of(lambda p, d: unit.apply(p, d), params, dyn, path)
    x = jnp.asarray(args[0], jnp.float32)
    trailing, size = 1, x.ndim
    while trailing < n_in and size > 1:
      size -= 1
      trailing *= x.shape[size]
    if trailing != n_in:
      raise ValueError(f'the input of {kernel.module!r} (shape {x.shape}) does not end in the kernel\'s {n_in} '
                       f'input features')
    x = x * valid.reshape((-1,) + (1,) * (x.ndim - 1))
    x = x.reshape(-1, n_in)
    # Full float32 products (GPTQ's reference turns TF32 off; on CPU this is the default anyway).
    return jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST), jnp.sum(valid) * (x.shape[0] // valid.shape[0])
  return jax.jit(fn)


@dataclasses.dataclass
class Candidate:
  """Finalized kernels a unit may keep: per kernel, its method's state and QTensor; the block loss with them and
  with ``acts`` (per kernel, the activation-quantizer state of its input; None: inputs float) on the samples the
  candidates are compared on (``QuantConfig.fallback_samples``; all by default), and ``loss_all`` on every sample
  when that was measured (None: not measured, or the same as ``loss``); ``non_finite``: the kernels (or 'loss')
  holding NaN or Inf (``_non_finite``; checked for trained and closed-form candidates)."""
  states: list
  qts: list
  loss: float
  acts: list | None = None
  non_finite: list[str] = dataclasses.field(default_factory=list)
  loss_all: float | None = None

  @property
  def loss_every_sample(self) -> float:
    return self.loss if self.loss_all is None else self.loss_all


@dataclasses.dataclass
class Outcome:
  """One unit's reconstruction: the ``baseline`` (RTN), the closed-form ``start`` of a unit that trains from one
  (else None), the ``trained`` (or solved) kernels, the ``kept`` one of those, and how training went."""
  baseline: Candidate
  trained: Candidate
  kept: Candidate
  start: Candidate | None = None
  iters: int = 0
  curve: list = dataclasses.field(default_factory=list)
  new_train_step: bool = False
  seconds_train: float = 0.0
  facts: dict = dataclasses.field(default_factory=dict)
  subset: np.ndarray | None = None


@dataclasses.dataclass
class UnitResult:
  """``outputs``: with ``reconstruct(keep_outputs=True)``, the unit's outputs on the cached inputs with the kept
  kernels (None when they were not computed in the final loss pass, e.g. after a fall-back). ``act_states``:
  {module path: state} of the activation quantizers of the unit's kernel inputs."""
  qtensors: dict[str, QTensor]
  report: dict
  states: dict[str, dict]
  outputs: ActivationStore | None = None
  act_states: dict[str, dict] = dataclasses.field(default_factory=dict)


class UnitReconstructor:
  """Reconstructs units of one run: holds the config, the device placement, the compile cache and the log."""

  def __init__(self, config: QuantConfig, placement: Placement, n_local: int, compiled: Compiled | None = None,
               log: Callable[..., None] | None = None):
    self.config = config
    self.placement = placement
    self.n = n_local
    self.chunk = placement.chunk_size(config.eval_batch_size)
    self.compiled = compiled or Compiled()
    self.log = log or (lambda **record: None)

  def forward(self, unit: Unit, unit_params, x: ActivationStore, act_states=None) -> ActivationStore:
    """The unit applied to every cached input (with ``act_states``: its kernel inputs quantized)."""
    store = ActivationStore(self.n, self.config.spill_dir, self.config.cache_dtype)
    if act_states is not None and unit.act_paths():
      return self.placement.map(self.compiled.forward(unit, acts=True), (unit_params, act_states), list(x.arrays),
                                store, self.chunk)
    return self.placement.map(self.compiled.forward(unit), unit_params, list(x.arrays), store, self.chunk)

  def calibrate_acts(self, unit: Unit, fp_unit, x_fp: ActivationStore) -> list[dict]:
    """Initial activation-quantizer states per kernel: static grids (``ActQuantizer.calibrate``) searched on the
    kernels' inputs in the float unit on its float inputs (the first ``act_calib_samples`` samples, QDrop's
    calibration); ``{}`` for dynamic quantizers and float inputs."""
    states = [{} for _ in unit.kernels]
    static = tuple(i for i in unit.act_paths() if unit.acts[i].static)
    if not static:
      return states
    m = min(self.config.act_calib_samples, self.n)
    fn = self.compiled.kernel_inputs(unit, static)
    parts = [[] for _ in static]
    for _, n_valid, chunk in activations.chunks([a[:m] for a in x_fp.arrays], self.chunk):
      for part, x in zip(parts, fn(fp_unit, self.placement.local(chunk))):
        part.append(np.asarray(x)[:n_valid])
    for i, part in zip(static, parts):
      states[i] = unit.acts[i].calibrate(np.concatenate(part))
    return states

  def eval_loss(self, unit: Unit, fp_unit, qts, x: ActivationStore, y: ActivationStore,
                outputs: ActivationStore | None = None, act_states=None, samples: np.ndarray | None = None,
                subset: np.ndarray | None = None):
    """Mean per-sample block loss over the calibration set (``samples``: only those local samples) with the
    finalized kernels ``qts`` (dequantized in the kernels' dtype, as ``dequantize_params`` does) and the kernel
    inputs quantized by ``act_states``; with ``outputs``, the unit's outputs go there too (the quantized model's
    inputs of the next unit, from the same pass). With ``subset`` (local sample indices), returns (mean over every
    sample, mean over ``subset``) from the same pass."""
    views = kernel_views(unit, fp_unit)
    params = with_kernels(fp_unit, unit, [qt.dequantize(v.dtype) for qt, v in zip(qts, views)])
    fn = self.compiled.loss_eval(unit, with_outputs=outputs is not None)
    arrays = list(x.arrays) + list(y.arrays)
    if samples is not None:
      arrays = [a[samples] for a in arrays]
    losses = np.zeros(len(arrays[0]), np.float64)
    for start, n_valid, chunk in activations.chunks(arrays, self.chunk):
      chunk = self.placement.local(chunk)
      per_sample = fn(params, chunk[:len(x.arrays)], chunk[len(x.arrays):], act_states)
      if outputs is not None:
        per_sample, out = per_sample
        outputs.write(start, n_valid, [np.asarray(o) for o in out])
      losses[start:start + n_valid] = np.asarray(per_sample)[:n_valid]
    mean = lambda values: activations.sum_over_processes(float(values.sum())) / (len(values) * jax.process_count())
    return mean(losses) if subset is None else (mean(losses), mean(losses[subset]))

  def hessian(self, unit: Unit, index: int, unit_params, x: ActivationStore) -> jax.Array:
    """H = 2/n sum x x^T (float32, (in, in)) over the n input rows (tokens) of kernel ``index`` on every cached
    input, streamed chunk by chunk."""
    fn = self.compiled.hessian(unit, index)
    total, rows = None, 0.0
    for _, n_valid, chunk in activations.chunks(list(x.arrays), self.chunk):
      valid = np.zeros(self.chunk, np.float32)
      valid[:n_valid] = 1.0
      xtx, n_rows = fn(unit_params, self.placement.local(chunk), self.placement.local(valid))
      total = xtx if total is None else total + xtx
      rows += float(n_rows)
    total = activations.sum_over_processes(np.asarray(total, np.float32))
    rows = activations.sum_over_processes(rows)
    return jnp.asarray(total * np.float32(2.0 / rows))

  def solve(self, unit: Unit, fp_unit, x_q: ActivationStore) -> tuple[list, dict]:
    """Start states of every kernel: closed-form solves in call order (each on the inputs of the unit with the
    kernels solved before it quantized), ``init`` for the others. Returns (states, {kernel: method facts})."""
    views = kernel_views(unit, fp_unit)
    states: list = [None] * len(unit.kernels)
    params = fp_unit
    facts, hessians = {}, {}
    for i in unit.call_order:
      method, spec = unit.methods[i], unit.specs[i]
      if method.solve is None:
        continue
      group = unit.input_groups[i] if unit.input_groups else i
      if group not in hessians:   # kernels of one input group (q, k, v) share their inputs' Hessian
        hessians = {group: self.hessian(unit, i, params, x_q)}
      states[i] = method.start(views[i], spec, hessians[group])
      qt = method.finalize(views[i], states[i], spec)
      params = treepath.set_leaf(params, unit.rel(unit.kernels[i]),
                                 unit.kernels[i].from_view(qt.dequantize(views[i].dtype)))
    for i, (method, spec) in enumerate(zip(unit.methods, unit.specs)):
      if states[i] is None:
        states[i] = method.start(views[i], spec)
      if method.report is not None:
        facts[treepath.path_str(unit.kernels[i].param_path)] = method.report(jax.device_get(states[i]))
    return states, facts

  def train(self, unit: Unit, fp_unit, states, x_q, x_fp, y_fp, iters: int, act_states=None):
    """``iters`` optax steps on the unit's trainable state (kernels, and the activation quantizers of its kernel
    inputs); returns (states, loss curve, newly compiled?, act_states).

    Steps run ``steps_per_dispatch`` at a time in one dispatch (``make_train_step``); the next chunk's minibatches
    are gathered on the host while the devices run the current one.
    """
    cfg = self.config
    split = [m.split(st) for m, st in zip(unit.methods, states)]
    trainable, frozen = [s[0] for s in split], [s[1] for s in split]
    has_acts = bool(unit.act_paths())
    if has_acts:
      a_train, a_frozen = split_acts(unit, act_states)
      trainable, frozen = (trainable, a_train), (frozen, a_frozen)
    (steps, opt), new = self.compiled.train_step(unit, iters, float(cfg.drop_prob), cfg.compute_dtype)
    trainable, frozen, unit_params = self.placement.state((trainable, frozen, fp_unit))
    weights.release_pages(fp_unit)   # memory-mapped params: their placed copy is what the steps read
    opt_state = self.placement.state(opt.init(trainable))
    self.state_bytes = self.placement.bytes_per_device((trainable, frozen, unit_params, opt_state))
    sampler = activations.Sampler(self.n, cfg.batch_size, cfg.sample_shards, cfg.seed, unit.index)
    key = jax.random.fold_in(jax.random.key(cfg.seed), unit.index)
    bar = _progress(iters, unit, cfg)
    every, interval = steps_per_dispatch(iters, unit), curve_interval(iters)
    curve, pending, recent = [], None, []

    def report(first, n_valid, losses):
      recent.extend(np.asarray(losses)[:n_valid].astype(np.float64).tolist())
      done = first + n_valid
      if done % interval and done != iters:
        return
      value = float(np.mean(recent))
      recent.clear()
      curve.append([done, value])
      if bar is not None:
        bar.set_postfix(loss=f'{value:.4g}')
        bar.update(done - (curve[-2][0] if len(curve) > 1 else 0))
      if len(curve) % 5 == 0 or done == iters:
        self.log(event='step', unit=unit.name, step=done, loss=value)

    for first in range(0, iters, every):
      n_valid = min(every, iters - first)   # the last chunk may be shorter: its own (cached) compile
      idx = np.stack([sampler(i) for i in range(first, first + n_valid)])   # (K, batch) sample indices
      xs = self.placement.global_batch([a[idx] for a in x_q.arrays], axis=1)
      ys = self.placement.global_batch([a[idx] for a in y_fp.arrays], axis=1)
      if cfg.drop_prob > 0:
        x0s = self.placement.global_batch([x_fp.arrays[0][idx]], axis=1)[0]
      else:
        x0s = self.placement.global_replicated(np.zeros((n_valid,), np.float32))
      trainable, opt_state, losses = steps(trainable, opt_state, frozen, unit_params, xs, ys, x0s, key,
                                           jnp.int32(first))
      if pending is not None:   # read the previous chunk's losses while this one runs
        report(*pending)
      pending = (first, n_valid, losses)
    if pending is not None:
      report(*pending)
    if bar is not None:
      bar.close()
    trainable, frozen = jax.device_get((trainable, frozen))
    if has_acts:
      act_states = [{**f, **t} for t, f in zip(trainable[1], frozen[1])]
      trainable, frozen = trainable[0], frozen[0]
    return [{**f, **t} for t, f in zip(trainable, frozen)], curve, new, act_states

  def reconstruct(self, unit: Unit, fp_unit, x_q: ActivationStore, x_fp: ActivationStore,
                  y_fp: ActivationStore, keep_outputs: bool = False) -> UnitResult:
    """Quantizes the unit's kernels (see the module docstring); ``fp_unit`` is the unit's float params subtree.
    ``keep_outputs``: also return the unit's outputs with the kept kernels, from the final loss pass."""
    iters = self.config.iters if any(m.trains for m in unit.methods) else 0
    solves = any(m.solve is not None for m in unit.methods)
    changes = iters > 0 or solves   # otherwise the unit keeps its baseline
    outputs = ActivationStore(self.n, self.config.spill_dir, self.config.cache_dtype) if keep_outputs else None
    acts = self.calibrate_acts(unit, fp_unit, x_fp) if unit.act_paths() else None
    if not changes:
      baseline = self.baseline(unit, fp_unit, x_q, y_fp, acts, outputs)
      return self.result(unit, Outcome(baseline=baseline, trained=baseline, kept=baseline), outputs)
    subset = self.fallback_subset()
    baseline = self.baseline(unit, fp_unit, x_q, y_fp, acts, subset=subset)
    states, facts = self.solve(unit, fp_unit, x_q)
    start = (self.closed_form_start(unit, fp_unit, states, x_q, y_fp, acts, subset) if iters > 0 and solves else
             None)
    curve, new_step, seconds_train = [], False, 0.0
    if iters > 0:
      t_train = time.perf_counter()
      states, curve, new_step, acts = self.train(unit, fp_unit, states, x_q, x_fp, y_fp, iters, acts)
      seconds_train = time.perf_counter() - t_train
    trained = self.candidate(unit, fp_unit, unit.methods, states, x_q, y_fp, acts, outputs, subset)
    trained.non_finite = _non_finite(unit, states, trained.qts, trained.loss_every_sample, acts)
    kept = self.choose(unit, baseline, start, trained)
    if kept is not trained:   # the outputs of the final loss pass are not the kept kernels'
      outputs = _discard(outputs)
      if subset is not None:   # the kept kernels' loss on every sample (and outputs) from a pass of their own
        outputs = ActivationStore(self.n, self.config.spill_dir, self.config.cache_dtype) if keep_outputs else None
        kept.loss_all = self.eval_loss(unit, fp_unit, kept.qts, x_q, y_fp, outputs, kept.acts)
    return self.result(unit, Outcome(baseline, trained, kept, start, iters, curve, new_step, seconds_train, facts,
                                     subset), outputs)

  def fallback_subset(self) -> np.ndarray | None:
    """Sorted local indices of the ``QuantConfig.fallback_samples`` samples the reference losses and the fall-back
    compare on: the same fixed subset in every unit, drawn with ``QuantConfig.seed`` (None: every sample)."""
    m = self.config.fallback_samples
    if m is None or m >= self.n:
      return None
    return np.sort(np.random.default_rng(self.config.seed).choice(self.n, m, replace=False))

  def candidate(self, unit: Unit, fp_unit, methods: list, states: list, x_q: ActivationStore,
                y_fp: ActivationStore, acts=None, outputs: ActivationStore | None = None,
                subset: np.ndarray | None = None, only_subset: bool = False) -> Candidate:
    """Per kernel, ``states`` finalized by ``methods``, and their block loss on every cached input (``outputs``:
    the unit's outputs go there too). With ``subset`` (local sample indices, ``fallback_subset``): ``loss`` on
    those samples, from the same pass as ``loss_all``, or (``only_subset``) from a pass over them alone."""
    views = kernel_views(unit, fp_unit)
    qts = [m.finalize(v, st, s) for m, v, st, s in zip(methods, views, states, unit.specs)]
    if subset is None:
      return Candidate(states, qts, self.eval_loss(unit, fp_unit, qts, x_q, y_fp, outputs, acts), acts)
    if only_subset:
      return Candidate(states, qts, self.eval_loss(unit, fp_unit, qts, x_q, y_fp, None, acts, samples=subset), acts)
    loss_all, loss = self.eval_loss(unit, fp_unit, qts, x_q, y_fp, outputs, acts, subset=subset)
    return Candidate(states, qts, loss, acts, loss_all=loss_all)

  def baseline(self, unit: Unit, fp_unit, x_q: ActivationStore, y_fp: ActivationStore, acts=None,
               outputs: ActivationStore | None = None, subset: np.ndarray | None = None) -> Candidate:
    """The unit's baseline (``Unit.baseline``, RTN) on every kernel: the start every method is compared with
    (``subset``: its loss on those samples alone)."""
    states = [unit.baseline.init(v, s) for v, s in zip(kernel_views(unit, fp_unit), unit.specs)]
    return self.candidate(unit, fp_unit, [unit.baseline] * len(unit.kernels), states, x_q, y_fp, acts, outputs,
                          subset, only_subset=True)

  def closed_form_start(self, unit: Unit, fp_unit, states: list, x_q: ActivationStore, y_fp: ActivationStore,
                        acts=None, subset: np.ndarray | None = None) -> Candidate:
    """The solved start of a unit that trains from it (GPTQ -> FlexRound), which training must beat: its states
    copied to the host (training donates the device buffers) and what of it is not finite (never kept)."""
    start = self.candidate(unit, fp_unit, unit.methods, states, x_q, y_fp, acts, subset=subset, only_subset=True)
    start.states = jax.device_get(states)
    start.non_finite = _non_finite(unit, start.states, start.qts, start.loss)
    return start

  def choose(self, unit: Unit, baseline: Candidate, start: Candidate | None, trained: Candidate) -> Candidate:
    """What the unit keeps: the ``trained`` kernels. A non-finite result is never kept: without
    ``fallback_to_rtn`` it is an error. With it, a unit that ends non-finite or worse than its finite closed-form
    ``start`` keeps the start, and then one whose kept kernels are non-finite or worse than the ``baseline`` keeps
    the baseline, each with a warning."""
    methods = ', '.join(sorted({m.name for m in unit.methods}))
    name = unit.baseline.name.upper()   # RTN
    bad = ', '.join(trained.non_finite)
    if not self.config.fallback_to_rtn:
      if bad:
        raise ValueError(f'unit {unit.name}: {methods} ended with NaN or Inf in {bad} (loss {trained.loss:.6g}); '
                         f'lower the learning rate, or set QuantConfig.fallback_to_rtn=True to keep {name} for such '
                         f'units (units finished before this one are in the checkpoint, if any)')
      return trained
    kept = trained
    if start is not None and not start.non_finite and (bad or not trained.loss <= start.loss):
      how = (f'with NaN or Inf in {bad}' if bad else
             f'at loss {trained.loss:.6g}, worse than its closed-form start {start.loss:.6g}')
      warnings.warn(f'unit {unit.name}: training ended {how}; keeping the start for this unit')
      kept, bad = start, ''
    if bad or not kept.loss <= baseline.loss:
      how = (f'ended with NaN or Inf in {bad}' if bad else
             f'ended at loss {kept.loss:.6g}, worse than its {name} start {baseline.loss:.6g}')
      warnings.warn(f'unit {unit.name}: {methods} {how}; keeping {name} for this unit')
      kept = baseline
    return kept

  def report(self, unit: Unit, outcome: Outcome) -> dict:
    """The unit's report (``QuantizeResult.report``), activation quantizers aside."""
    o = outcome
    rep = {'unit': unit.name, 'kind': unit.kind, 'kernels': len(unit.kernels),
           'bits': sorted({s.bits for s in unit.specs}), 'methods': sorted({m.name for m in unit.methods}),
           'loss_rtn': o.baseline.loss, 'loss_final': o.kept.loss_every_sample,
           'loss_trained': o.trained.loss_every_sample, 'iters': o.iters,
           'fell_back_to_rtn': o.kept is o.baseline and o.trained is not o.baseline, 'loss_curve': o.curve,
           'new_train_step': o.new_train_step, 'seconds_train': round(o.seconds_train, 3)}
    if o.iters > 0:   # params, quantizer state and optimizer moments of the block on one device while training
      rep['state_bytes_per_device'] = self.state_bytes
    if o.start is not None:
      rep.update(loss_start=o.start.loss, kept_start=o.kept is o.start)
    if o.subset is not None:   # loss_rtn, loss_start and these compare on the same samples; loss_final: on all
      rep.update(fallback_subset=[int(i) for i in o.subset], loss_final_subset=o.kept.loss,
                 loss_trained_subset=o.trained.loss)
    if o.trained.non_finite:
      rep['non_finite'] = o.trained.non_finite
    if o.facts:
      rep['method_facts'] = o.facts
    return rep

  def result(self, unit: Unit, outcome: Outcome, outputs: ActivationStore | None) -> UnitResult:
    """The UnitResult of the kept kernels: their QTensors, the report with the activation quantizers' final states
    and, with ``keep_states``, the method's states (the start's when it is kept; the trained ones also after a
    fall-back to the baseline)."""
    kept, names = outcome.kept, unit.kernel_names()
    rep = self.report(unit, outcome)
    act_states = {}
    if kept.acts is not None:   # exact JSON numbers: a resumed run rebuilds the states from the report
      act_states = {unit.kernels[i].module: _finalize_act(unit.acts[i], jax.device_get(kept.acts[i]))
                    for i in unit.act_paths()}
      rep['activations'] = {m: {'quantizer': unit.acts[i].describe(), 'state': act_lib.state_to_json(act_states[m])}
                            for i, m in zip(unit.act_paths(), act_states)}
    states = (outcome.start if kept is outcome.start else outcome.trained).states
    kept_states = {n: jax.device_get(st) for n, st in zip(names, states)} if self.config.keep_states else {}
    qtensors = {n: qt if k.axes is None else dataclasses.replace(qt, axes=k.axes)   # how to lay them back out
                for n, k, qt in zip(names, unit.kernels, kept.qts)}
    return UnitResult(qtensors=qtensors, report=rep, states=kept_states, outputs=outputs, act_states=act_states)

def _finalize_act(q, state) -> dict:
  return q.finalize(state) if q.finalize is not None else dict(state)


def _discard(store: ActivationStore | None) -> None:
  if store is not None:
    store.close()


def curve_interval(iters: int) -> int:
  """Steps per point of the loss curve: about 20 points per unit, at most 50 steps apart."""
  return max(1, min(50, iters // 20))


def steps_per_dispatch(iters: int, unit: Unit | None = None) -> int:
  """Training steps per dispatch: ``curve_interval(iters)``, run as a ``lax.scan``; 1 for units with convolutions
  on CPU, where XLA runs a convolution inside a loop about 7x slower than a top-level one (measured:
  benchmarks/bench_engine.py, the ResNet block)."""
  if unit is not None and jax.default_backend() == 'cpu' and any(k.is_conv for k in unit.kernels):
    return 1
  return curve_interval(iters)


def _non_finite(unit: Unit, states, qts, loss, act_states=None) -> list[str]:
  """Names of the unit's kernels whose final state or QTensor scale holds NaN or Inf, and '<module> input' for
  activation quantizers whose state does (['loss'] when only the block loss does)."""
  def finite(leaves):
    return all(np.isfinite(np.asarray(l)).all() for l in leaves if jnp.issubdtype(np.asarray(l).dtype, jnp.floating))
  bad = []
  for name, state, qt in zip(unit.kernel_names(), states, qts):
    if not finite(jax.tree.leaves(jax.device_get(state)) + [qt.scale]):
      bad.append(name)
  for i in unit.act_paths() if act_states is not None else ():
    if not finite(jax.tree.leaves(jax.device_get(act_states[i]))):
      bad.append(f'{unit.kernels[i].module} input')
  return bad or ([] if np.isfinite(loss) else ['loss'])


def _progress(iters, unit, cfg):
  if not cfg.progress or jax.process_index() != 0:
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  names = ','.join(sorted({m.name for m in unit.methods if m.trains}))
  return tqdm(total=iters, desc=f'{names} {unit.name}', unit='it', leave=True, dynamic_ncols=True)


def reconstruct_unit(unit: Unit, fp_unit, x_q: list, y_fp: list, config: QuantConfig,
                     x_fp: list | None = None) -> UnitResult:
  """Reconstructs one unit (from ``plan_units``) on its own, outside the ``quantize`` loop.

  ``fp_unit``: the unit's float params subtree; ``x_q``: its batched inputs in the (partially) quantized model,
  ``y_fp``: the float unit's outputs, ``x_fp``: its inputs in the float model (needed when ``drop_prob > 0`` and
  to calibrate static activation quantizers), each a list of host arrays with the samples on axis 0.
  """
  n = int(np.shape(x_q[0])[0])
  if config.drop_prob > 0 and x_fp is None:
    raise ValueError('reconstruct_unit: QuantConfig.drop_prob > 0 mixes in the float inputs; pass x_fp')
  if x_fp is None and any(unit.acts[i].static for i in unit.act_paths()):
    raise ValueError('reconstruct_unit: static activation quantizers calibrate on the float inputs; pass x_fp')
  if any(m.trains for m in unit.methods) and config.iters > 0 and config.batch_size > n:
    raise ValueError(f'QuantConfig.batch_size={config.batch_size} is larger than the {n} samples given')
  stores = [ActivationStore.from_arrays(list(a), config.spill_dir, config.cache_dtype)
            for a in (x_q, x_fp or x_q, y_fp)]
  recon = UnitReconstructor(config, Placement.of(config), n)
  try:
    return recon.reconstruct(unit, fp_unit, *stores)
  finally:
    for store in stores:
      store.close()
