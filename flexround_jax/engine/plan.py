"""Planning: which units a model is reconstructed in, what each unit holds, and how its inputs are obtained.

A unit is a block matched by ``QuantConfig.blocks`` (all its kernels reconstructed together) or a lone kernel layer
outside every block. The model is traced once on one and on two calibration samples: the calls give each unit's
module, its inputs (which of them carry the batch) and its kernels; each kernel gets its spec and method from the
config's rules. A unit whose first input is the previous unit's output array itself, with nothing computed on it in
between (and whose other inputs are the arrays the previous unit received), is a chain: its inputs are propagated
through the previous unit alone. This is read from the trace's data flow, never from equal values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import methods as methods_lib
from .. import treepath, weights
from . import activations, graph
from .config import QuantConfig
from ..quantizers.base import Method
from ..spec import QuantSpec


@dataclasses.dataclass
class Unit:
  """One reconstruction unit.

  Attributes:
    index, name, kind: position in forward order, module path, 'block' or 'layer'.
    call: the probe call (apply function, signature, example inputs and output).
    prefix: params keys of the unit's subtree.
    kernels, specs, methods: the unit's quantized kernels (params order) with their QuantSpec and Method.
    baseline: the Method every kernel starts from and is compared with (``methods.BASELINE``, RTN): the report's
      ``loss_rtn``, and what the unit keeps when it ends worse (``QuantConfig.fallback_to_rtn``).
    acts: per kernel, the ActQuantizer of its module's input, or None (float input).
    call_order: kernel indices in the order their modules are first called (closed-form methods solve in it).
    input_groups: per kernel, the first kernel of its run of call-order neighbours that receive the same input (q, k,
      v; gate, up): they share one input Hessian, since solving one cannot change the others' input.
    treedef, batched, constants: how the unit's (args, kwargs) are rebuilt from the cached batched arrays.
    chain_from_previous: inputs come from the previous unit's output (see the module docstring).
  """

  index: int
  name: str
  kind: str
  call: graph.Call
  prefix: tuple
  kernels: list[graph.Kernel]
  specs: list[QuantSpec]
  methods: list[Method]
  baseline: Method
  treedef: Any
  batched: tuple[bool, ...]
  constants: tuple
  call_order: tuple[int, ...] = ()
  input_groups: tuple[int, ...] = ()
  chain_from_previous: bool = False
  acts: tuple = ()
  _static_key: Any = None

  def rebuild(self, dyn_leaves):
    dyn = iter(dyn_leaves)
    leaves = [next(dyn) if b else c for b, c in zip(self.batched, self.constants)]
    args, kwargs = jax.tree.unflatten(self.treedef, leaves)
    return args, kwargs

  def rel(self, kernel: graph.Kernel) -> tuple:
    """Keys of ``kernel`` inside the unit's params subtree."""
    return kernel.param_path[len(self.prefix):]

  def kernel_names(self) -> list[str]:
    return [treepath.path_str(k.param_path) for k in self.kernels]

  def apply(self, params, dyn_leaves):
    """The unit's forward on its params subtree and its batched inputs."""
    args, kwargs = self.rebuild(dyn_leaves)
    return self.call.apply(params, *args, **kwargs)

  @property
  def static_key(self):
    """Hashable description of everything static in this unit's computation (the compile cache key)."""
    if self._static_key is None:
      consts = tuple(_hashable(c) for b, c in zip(self.batched, self.constants) if not b)
      self._static_key = (self.call.signature, str(self.treedef), self.batched, consts,
                          tuple((self.rel(k), k.shape, k.view_shape) + ((k.axes,) if k.axes else ())
                                for k in self.kernels), tuple(self.specs),
                          tuple(self.methods), tuple(self.acts))
    return self._static_key

  def act_paths(self) -> dict[int, str]:
    """{kernel index: its module's path inside the unit} for the kernels whose input is quantized."""
    return {i: relative_module(self, k.module) for i, k in enumerate(self.kernels) if self.acts and self.acts[i]}


def relative_module(unit: Unit, module: str) -> str:
  """A module's path inside the unit ('' for the unit's own module), as the unit's ``apply`` names it."""
  return '' if module == unit.name else module[len(unit.name) + 1:]


def _hashable(x):
  if isinstance(x, (np.ndarray, jax.Array)):
    return ('array', np.shape(x), str(np.asarray(x).dtype), hashlib.sha1(np.asarray(x).tobytes()).hexdigest())
  try:
    hash(x)
    return x
  except TypeError:
    return repr(x)


def check_params(tree):
  """ValueError if ``tree`` is empty, holds a key with '/' (kernels are named by '/'-joined paths, so the exports
  could not name it), or a non-finite float leaf."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not leaves:
    raise ValueError('params is empty')
  treepath.flatten_params(tree)
  for kp, leaf in leaves:
    dtype = np.dtype(leaf.dtype if hasattr(leaf, 'dtype') else np.asarray(leaf).dtype)   # no host copy
    if jnp.issubdtype(dtype, jnp.floating) and not _all_finite(leaf):   # every float dtype (bfloat16 too)
      raise ValueError(f'params contain NaN or Inf at {jax.tree_util.keystr(kp)}')


@jax.jit
def _finite_and_peak(x):
  x = x.astype(jnp.float32)
  return jnp.isfinite(x).all(), jnp.max(jnp.abs(x), initial=0.0)


# IEEE binary formats by their bits: with the sign bit cleared, the bits order like |x|, and x is finite iff they are
# below +Inf's. One integer max per chunk answers both "all finite?" and "max |x|?" (numpy compares bfloat16 element
# by element through a cast: about 60 M elements/s, against GB/s for uint16).
_IEEE = {np.dtype(f): np.dtype(u) for f, u in ((np.float64, np.uint64), (np.float32, np.uint32),
                                                (np.float16, np.uint16), (jnp.bfloat16, np.uint16))}
_HOST_CHUNK = 1 << 22   # elements per pass: a temporary of 8-32 MB whatever the leaf's size


def host_finite_and_peak(leaf) -> tuple[bool, np.float32]:
  """(every element finite, max |x| in float32) of a host float array, read once in chunks (a contiguous one, as a
  memory map is, is never copied whole; a read-only map's pages are then dropped from the resident set,
  ``weights.release_pages``, so checking a model larger than RAM does not hold it). max |x| is exact: the largest
  magnitude, cast to float32 as the quantizers compute."""
  try:
    return _host_finite_and_peak(np.asarray(leaf))
  finally:
    weights.release_pages(leaf)


def _host_finite_and_peak(a: np.ndarray) -> tuple[bool, np.float32]:
  flat = a.ravel(order='K')   # memory order: a view of a transposed map too (load_hf's kernels), not a copy
  bits = _IEEE.get(a.dtype)
  finite, peak = True, np.float32(0)
  if bits is not None:
    sign_off = np.array(np.iinfo(bits).max >> 1, bits)
    inf = np.array(np.inf, a.dtype).view(bits)
    top = np.array(0, bits)
    for start in range(0, flat.size, _HOST_CHUNK):
      top = max(top, np.bitwise_and(flat[start:start + _HOST_CHUNK].view(bits), sign_off).max())
    return bool(top < inf), np.asarray(top, bits).view(a.dtype).astype(np.float32)
  for start in range(0, flat.size, _HOST_CHUNK):   # other float formats (float8, ...): through float32
    x = np.abs(flat[start:start + _HOST_CHUNK].astype(np.float32))
    finite = finite and bool(np.isfinite(x).all())
    peak = max(peak, x.max())
  return finite, np.float32(peak)


def _all_finite(leaf) -> bool:
  """Whether every element is finite: a jax.Array is reduced where it lives (a sharded array is never gathered
  to one device or host), anything else on the host (a memory-mapped leaf is read, not copied to a device)."""
  if isinstance(leaf, jax.Array):
    return bool(_finite_and_peak(leaf)[0])
  return host_finite_and_peak(leaf)[0]


def plan_units(model_fn, tree, calib, config: QuantConfig, baseline: Method | None = None) -> list[Unit]:
  """The units of ``model_fn(tree, batch)`` in forward order (``calib``: host arrays from ``activations.as_arrays``).
  ``baseline``: the units' baseline Method (None: ``methods.BASELINE``), one that starts from ``init`` untrained.

  Raises ValueError, before any long work, when the model fails on the calibration data (also at the batch sizes
  the run uses), when its float forward on the probe samples is not finite (``check_float_forward``), when a rule
  or the block regex matches nothing usable, when a kernel cannot be quantized (a zero-size axis, weights whose
  grid step overflows float32) or when a kernel's method cannot take it.
  """
  baseline = methods_lib.get(methods_lib.BASELINE) if baseline is None else baseline
  if not isinstance(baseline, Method) or baseline.init is None or baseline.solve is not None or baseline.trains:
    raise ValueError(f'baseline must be a Method that starts from init alone, untrained (methods.rtn()), got '
                     f'{baseline!r}')
  n = activations.num_samples(calib)
  probe_sizes = (1, 2) if n >= 2 else (1,)
  traces = []
  for size in probe_sizes:   # the last probe runs (values: constants, shared inputs); the one before only traces
    probe = activations.take(calib, np.arange(size))
    try:
      if size < probe_sizes[-1]:
        traces.append(graph.trace_call_shapes(model_fn, tree, probe))
      else:
        # Outputs of calls inside a block are not kept (planning reads the units' outputs, and the args of every
        # call): the probe holds about half the values (SmolLM2: 0.6 GB less at the run's planning peak).
        calls, probe_output = graph.trace_calls(model_fn, tree, probe,
                                                keep_output=lambda path: not _inside_a_block(path, config.blocks))
        traces.append(calls)
    except Exception as e:  # the user's model failing is reported before any long work
      raise ValueError(f'apply_fn(params, batch) failed on the first {size} calibration sample(s): '
                       f'{type(e).__name__}: {e}') from e
  calls = traces[-1]
  if not calls:
    raise ValueError('apply_fn called no Flax submodule: is it a Flax linen (module.apply) or nnx (nnx.merge) '
                     'model, run inside apply_fn?')
  paths = list(dict.fromkeys(c.path for c in calls))
  for rule in config.rules:
    if not any(rule.matches(p) for p in paths):
      raise ValueError(f'QuantConfig rule {rule.pattern!r} matches no module path (re.fullmatch). Module paths seen: '
                       f'{paths[:30]}{" ..." if len(paths) > 30 else ""}')
  kernels = graph.find_kernels(tree, calls, skip=lambda module: config.resolve(module) is None,
                               weight_params=config.weight_params)
  if not kernels:
    raise ValueError('params hold no quantizable kernel (a "kernel" leaf of rank >= 2 in a called module, not '
                     'skipped by a rule; weights with other names: QuantConfig(weight_params=[WeightParam(...)]))')
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
  units, checked = [], set()
  for owner, ks in sorted(groups.items(), key=lambda kv: first_call[kv[0]].index):
    call = first_call[owner]
    depth = len(owner.split('/')) if owner else 0   # '': the root module holds its kernels itself
    prefix = ks[0].param_path[:depth]
    leaves, treedef = jax.tree.flatten((call.args, call.kwargs))
    small = jax.tree.leaves((small_calls[owner].args, small_calls[owner].kwargs))
    batched = tuple(
        hasattr(l, 'shape') and np.ndim(l) >= 1 and (len(probe_sizes) == 1 or np.shape(s)[0] != np.shape(l)[0])
        for l, s in zip(leaves, small))
    if not any(batched):
      raise ValueError(f'unit {owner!r} receives no array with the batch on axis 0; cannot cache its inputs')
    constants = tuple(None if b else (np.asarray(l) if hasattr(l, 'shape') else l) for l, b in zip(leaves, batched))
    resolved = [config.resolve(k.module) for k in ks]
    acts = tuple(config.resolve_activation(k.module) for k in ks)
    for k, act in zip(ks, acts):
      args = first_call[k.module].args
      if act is not None and (not args or not hasattr(args[0], 'shape')):
        raise ValueError(f'module {k.module!r} takes no array as its first positional argument, so its input cannot '
                         f'be quantized; keep it float with Rule({k.module!r}, activation="float")')
      if act is not None and sum(j.module == k.module for j in ks) > 1:   # WeightParams: one input, several weights
        raise ValueError(f'module {k.module!r} holds several quantized weights, each with its own input quantizer '
                         f'of one input; keep its input float with Rule({k.module!r}, activation="float")')
    for k, (spec, method) in zip(ks, resolved):
      _check_kernel_values(k, spec, treepath.get_subtree(tree, k.param_path), baseline)
      _check_method_takes(k, spec, method, checked)
    units.append(Unit(index=len(units), name=owner, kind='block' if owner in block_paths else 'layer', call=call,
                      prefix=prefix, kernels=ks, specs=[r[0] for r in resolved], methods=[r[1] for r in resolved],
                      baseline=baseline, treedef=treedef, batched=batched, constants=constants,
                      call_order=(order := tuple(sorted(range(len(ks)), key=lambda i: first_call[ks[i].module].index))),
                      input_groups=_input_groups(ks, order, first_call),
                      acts=acts))
  for prev, unit in zip(units, units[1:]):
    unit.chain_from_previous = is_chain(prev, unit)
  check_float_forward(calls, probe_output, units, tree, probe,
                      retrace=lambda: graph.trace_calls(model_fn, tree, probe)[0])
  _check_batch_sizes(model_fn, tree, calib, units, config)
  return units


def _has_non_finite(tree, nan_only: bool = False) -> bool:
  """Whether some float leaf of ``tree`` holds NaN or Inf (``nan_only``: NaN), reduced where it lives."""
  for leaf in jax.tree.leaves(tree):
    if not hasattr(leaf, 'dtype') or not jnp.issubdtype(leaf.dtype, jnp.floating):
      continue
    if nan_only:
      if bool(jnp.isnan(jnp.asarray(leaf)).any()):
        return True
    elif not _all_finite(leaf):
      return True
  return False


def _inside_a_block(path: str, blocks: str | None) -> bool:
  """Whether module ``path`` is a strict submodule of a module whose path ``blocks`` fully matches."""
  parts = path.split('/') if blocks is not None and path else []
  return any(re.fullmatch(blocks, '/'.join(parts[:i])) for i in range(1, len(parts)))


def check_float_forward(calls: list[graph.Call], output, units: list[Unit], tree, probe, retrace=None):
  """Raises ValueError, naming where it starts, when the float model's forward on the probe samples ``probe`` (the
  traced ``calls`` and ``output`` of ``graph.trace_calls``) is not finite: a unit's output holds NaN or Inf (its
  block loss could not be computed), or the model's output holds NaN (Inf is allowed there: masked logits).

  Params and calibration data are checked first (``check_params``, ``activations.as_arrays``), so a non-finite
  forward comes from an array ``apply_fn`` closes over (BatchNorm statistics, a normalisation constant) or from the
  model's own math (an overflow, a division by zero). The message names the first module whose output is not
  finite while its inputs are (the innermost such module), or else the first module whose inputs already are not
  (computed by ``apply_fn`` outside every Flax module). Costs one finiteness reduction per unit output; the
  module search runs only when the check fails (on ``retrace()``'s calls when given: the probe traced again with
  every call's output, for a plan that kept only some).
  """
  bad_unit = next((u for u in units if _has_non_finite(u.call.output)), None)
  if bad_unit is None and not _has_non_finite(output, nan_only=True):
    return
  check_params(tree)   # normally already checked: the message below must be true
  if retrace is not None:
    calls = retrace()
  if _has_non_finite(probe):
    raise ValueError('calib_data contains NaN or Inf')
  size = activations.num_samples(probe)
  where = (f'the output of unit {bad_unit.name!r} holds NaN or Inf' if bad_unit is not None else
           "apply_fn's output holds NaN")
  origin = [c for c in calls if not _has_non_finite((c.args, c.kwargs)) and _has_non_finite(c.output)]
  inner = [c for c in origin if not any(d.index > c.index and _inside(d.path, c.path) for d in origin)]
  name = lambda c: f'module {c.path!r} ({c.cls_name})' if c.path else f'the root module ({c.cls_name})'
  if inner:
    source = f'{name(inner[0])} is the first whose output holds NaN or Inf while its inputs are finite'
  else:
    c = next((c for c in calls if _has_non_finite((c.args, c.kwargs))), None)
    source = ('every module gets finite inputs and returns finite outputs: apply_fn computes the NaN outside its '
              'Flax modules' if c is None else
              f'{name(c)} already gets NaN or Inf inputs: apply_fn computes them outside its Flax modules, before '
              f'calling it')
  raise ValueError(f'the float model is not finite on the first {size} calibration sample(s): {where}, though params '
                   f'and calib_data are finite; {source}. So the cause is an array closed over by apply_fn (e.g. '
                   f'BatchNorm statistics, other variables passed to module.apply) or the model\'s own math (an '
                   f'overflow, a division by zero); quantizing it would give NaN losses and a NaN model')


def _inside(path: str, parent: str) -> bool:
  """Whether module ``path`` is a submodule of ``parent`` ('' is the root module)."""
  return path != parent and (parent == '' or path.startswith(parent + '/'))


def _input_groups(kernels, order, first_call) -> tuple[int, ...]:
  """Per kernel (params order), the kernel index heading its run of consecutive call-order kernels whose modules
  got equal first inputs in the probe trace."""
  groups = [0] * len(kernels)
  head, head_input = None, None
  for i in order:
    args = first_call[kernels[i].module].args
    x = np.asarray(args[0]) if args and hasattr(args[0], 'shape') else None
    if head is None or x is None or head_input is None or x.shape != head_input.shape or \
        not np.array_equal(x, head_input):
      head, head_input = i, x
    groups[i] = head
  return tuple(groups)


def _check_method_takes(kernel: graph.Kernel, spec: QuantSpec, method: Method, checked: set):
  """Raises ValueError, naming the kernel, when its method cannot take it (a closed-form method on a convolution,
  a shape the method's ``init`` refuses), so a bad combination fails at planning, not hours into a run."""
  name = treepath.path_str(kernel.param_path)
  if method.solve is not None and kernel.is_conv:
    raise ValueError(f'kernel {name} is a convolution; method {method.name!r} solves Dense kernels only: give it '
                     f'another method with a Rule')
  if method.solve is not None and kernel.declared:
    # The Hessian is taken over the module's first positional argument, read as (..., in) in the view's input
    # order: nothing says an einsum module's input is laid out so.
    raise ValueError(f'weight {name} is named by a WeightParam; method {method.name!r} solves Dense kernels only (from '
                     f'the Hessian of the module\'s first argument): give it another method (rtn, flexround, adaround, '
                     f'lrq) with a Rule({kernel.module!r}, method=...)')
  key = (method, kernel.view_shape, spec)
  if method.init is None or key in checked:
    return
  try:   # abstract evaluation: shapes only, no compute
    jax.eval_shape(lambda k: method.init(k, spec), jax.ShapeDtypeStruct(kernel.view_shape, np.float32))
  except ValueError as e:
    raise ValueError(f'kernel {name} (view {kernel.view_shape}): method {method!r} cannot take it: {e}') from e
  checked.add(key)


def _check_kernel_values(kernel: graph.Kernel, spec: QuantSpec, leaf, baseline: Method):
  """Raises ValueError, naming the kernel, for a kernel with a zero-size axis, or one whose ``baseline`` start (RTN:
  the start of every method) is not finite: its grid step overflows float32 when |w| is near float32's max."""
  name = treepath.path_str(kernel.param_path)
  if 0 in kernel.shape:
    raise ValueError(f'kernel {name} has shape {kernel.shape}, with a zero-size axis: nothing to quantize; keep it '
                     f'float with a rule: QuantConfig(rules=[Rule({kernel.module!r}, skip=True)])')
  if isinstance(leaf, jax.Array):   # reduced where it lives: a sharded kernel is not gathered
    peak = np.float32(_finite_and_peak(leaf)[1])
  else:
    peak = host_finite_and_peak(leaf)[1]
  with np.errstate(over='ignore'):
    if np.isfinite(np.float32(4) * peak):   # every step <= 2 max|w| / (2^b - 1), and |w_hat| <= 2 max|w|: finite
      return
  view = kernel.to_view(jnp.asarray(leaf))
  w_hat = baseline.finalize(view, baseline.init(view, spec), spec).dequantize(jnp.float32)
  if not np.isfinite(np.asarray(w_hat)).all():
    raise ValueError(f'kernel {name}: max |w| = {float(peak):.4g} is too close to the float32 maximum: its '
                     f'{spec.bits}-bit grid step or its quantized weights are Inf; rescale the weights or keep the '
                     f'kernel float with a rule: QuantConfig(rules=[Rule({kernel.module!r}, skip=True)])')


def _check_batch_sizes(model_fn, tree, calib, units: list[Unit], config: QuantConfig):
  """Runs abstractly (``jax.eval_shape``: shapes only, no compute) what a run runs, at the sizes it runs it: the
  model forward up to the last unit on chunks of ``eval_batch_size`` samples, and each trained unit on minibatches
  of ``batch_size``. A model that fails only at those sizes (the probes are 1 and 2 samples) fails here, before any
  long work."""
  chunk = activations.Placement.of(config).chunk_size(config.eval_batch_size)
  like = lambda x, size: jax.ShapeDtypeStruct((size,) + tuple(np.shape(x)[1:]), x.dtype)

  def forward(t, batch):   # as the run's forwards: the model stops at the unit, here the last one
    graph.inputs_of(model_fn, t, batch, units[-1].name)

  try:
    jax.eval_shape(forward, tree, jax.tree.map(lambda x: like(x, chunk), calib))
  except Exception as e:  # the user's model failing is reported before any long work
    raise ValueError(f'apply_fn(params, batch) failed on a batch of {chunk} samples, the size of the forwards over '
                     f'the calibration set (QuantConfig.eval_batch_size={config.eval_batch_size}): '
                     f'{type(e).__name__}: {e}') from e
  if config.iters == 0:
    return
  seen = set()
  for u in units:
    if not any(m.trains for m in u.methods) or u.static_key in seen:
      continue
    seen.add(u.static_key)
    dyn = [like(l, config.batch_size) for l, b in zip(jax.tree.leaves((u.call.args, u.call.kwargs)), u.batched) if b]
    try:
      jax.eval_shape(u.apply, treepath.get_subtree(tree, u.prefix), dyn)
    except Exception as e:  # the unit failing at the training batch size, likewise
      raise ValueError(f'unit {u.name!r} failed on a minibatch of QuantConfig.batch_size={config.batch_size} '
                       f'samples: {type(e).__name__}: {e}') from e


def is_chain(prev: Unit, unit: Unit) -> bool:
  """True if, in the traced forward, ``unit``'s first batched input is the very array ``prev`` returned and its other
  batched inputs are the very arrays ``prev`` received: nothing ran on them in between.

  Decided from the program's data flow (object identity in the trace), not from values: an op between the blocks
  that happens to be the identity on the probe samples (a padding mask, a clip, a dropout at rate 0) still breaks
  the chain, so the unit's inputs then come from running the model.
  """
  out = prev.call.output
  if not hasattr(out, 'shape'):
    return False
  cur = [l for l, b in zip(jax.tree.leaves((unit.call.args, unit.call.kwargs)), unit.batched) if b]
  before = [l for l, b in zip(jax.tree.leaves((prev.call.args, prev.call.kwargs)), prev.batched) if b]
  return len(cur) == len(before) and cur[0] is out and all(a is b for a, b in zip(cur[1:], before[1:]))


def describe(units: list[Unit], n: int, config: QuantConfig) -> list[dict]:
  """One dict per unit: kernels, bits, methods, weights, activation cache size, where its inputs come from."""
  plan = []
  for u in units:
    dyn = [l for l, b in zip(jax.tree.leaves((u.call.args, u.call.kwargs)), u.batched) if b]
    per_sample_in = sum(_cached_bytes(l, config) for l in dyn)
    per_sample_out = sum(_cached_bytes(l, config) for l in jax.tree.leaves(u.call.output))
    copies = 2 if config.drop_prob > 0 else 1
    plan.append({
        'unit': u.name, 'kind': u.kind,
        'kernels': u.kernel_names(),
        'bits': [s.bits for s in u.specs],
        'methods': [m.name for m in u.methods],
        'activations': [repr(a) if a else 'float' for a in u.acts],
        'params': int(sum(math.prod(k.shape) for k in u.kernels)),
        'activation_bytes': int(n * (per_sample_in * (1 + copies) + per_sample_out)),
        'inputs_from': 'previous unit' if u.chain_from_previous else 'model forward',
    })
  return plan


def _cached_bytes(leaf, config: QuantConfig) -> int:
  """Bytes of one sample of ``leaf`` in the activation cache (floating leaves in ``QuantConfig.cache_dtype``)."""
  sample = np.asarray(leaf)[0]
  if config.cache_dtype != 'float32' and jnp.issubdtype(sample.dtype, jnp.floating):
    return sample.size * jnp.dtype(config.cache_dtype).itemsize
  return sample.nbytes


def print_plan(plan, n, config: QuantConfig):
  lines = [f'quantization plan: method={config.method!r}, {len(plan)} units, {n} calibration samples, '
           f'{config.iters} iters x batch {config.batch_size}']
  for p in plan:
    lines.append(f"  [{p['kind']:5s}] {p['unit']:40s} {len(p['kernels']):3d} kernels  {p['params']:>11,d} weights  "
                 f"bits {sorted(set(p['bits']))}  {','.join(sorted(set(p['methods'])))}  "
                 f"{_act_summary(p['activations'])}"
                 f"activations {p['activation_bytes'] / 2**20:8.1f} MiB  {_state_summary(p)}"
                 f"inputs: {p['inputs_from']}")
  peak = max(p['activation_bytes'] for p in plan)
  lines.append(f'  peak activation cache (one unit at a time): {peak / 2**20:.1f} MiB')
  if all('state_bytes' in p for p in plan):
    top = max(plan, key=lambda p: p['state_bytes'])
    lines.append(f"  peak training state per device (params, method and optimizer state of one unit): "
                 f"{_state_summary(top).split(' ', 1)[1].strip()} ({top['unit']})")
  print('\n'.join(lines))


def _state_summary(p) -> str:
  """'state 123.4 MiB  ' ('>=' when closed-form methods' states are not counted); '' before sizes are known."""
  if 'state_bytes' not in p:
    return ''
  return f"state {'' if p['state_bytes_exact'] else '>='}{p['state_bytes'] / 2**20:.1f} MiB  "


def _act_summary(acts) -> str:
  quantized = sorted(set(a for a in acts if a != 'float'))
  if not quantized:
    return ''
  return f"inputs {','.join(quantized)}{' (some float)' if 'float' in acts else ''}  "
