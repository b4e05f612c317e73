"""What the engine sees of a model: the calls of its submodules, its kernels, and the units it reconstructs.

Works on any Flax model through its pure ``apply_fn(params, batch)``, with no model-specific code:
  * Linen: ``flax.linen.intercept_methods`` reports every submodule ``__call__`` with its path, inputs and output;
    a block is re-applied alone as ``module.clone(parent=None).apply({'params': p, ...}, *args)``.
  * NNX: ``nnx.merge`` is wrapped while the model is traced, so the merged module graph gives every submodule's
    path; their classes' ``__call__`` report the same events; a block is re-applied with ``nnx.merge``.

Paths are '/'-joined module names ('encoder/layer_0/query'); user regexes match them with ``re.fullmatch``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from .. import _layout, treepath
from ..treepath import path_str

Params = Any
_local = threading.local()


@dataclasses.dataclass
class Call:
  """One submodule call seen while tracing the model."""

  path: str
  cls_name: str
  index: int                          # order in which calls started
  args: tuple
  kwargs: dict
  output: Any = None
  apply: Callable | None = None       # (params_subtree, *args, **kwargs) -> output, for the module alone
  signature: Any = None               # hashable: equal for interchangeable modules (jit cache key)
  info: dict = dataclasses.field(default_factory=dict)


class _StopForward(Exception):

  def __init__(self, call: Call):
    super().__init__(call.path)
    self.call = call


# ---------------------------------------------------------------------------------------------- interception ----

def _module_info(module) -> dict:
  info = {}
  for attr in ('features', 'out_features', 'axis', 'feature_group_count', 'kernel_size', 'in_features'):
    if hasattr(module, attr):
      value = getattr(module, attr)
      if isinstance(value, (int, tuple, list)) or value is None:
        info[attr] = value
  return info


class _Recorder:
  """Collects calls; optionally stops the forward pass at the first call of ``stop_at``."""

  def __init__(self, keep_values: bool, stop_at: str | None = None, want_apply: bool = True,
               keep_output: Callable[[str], bool] | None = None):
    self.calls: list[Call] = []
    self.keep_values = keep_values
    self.stop_at = stop_at
    self.want_apply = want_apply
    self.keep_output = keep_output

  def before(self, path, module_cls_name, args, kwargs, make_apply, info) -> Call:
    call = Call(path=path, cls_name=module_cls_name, index=len(self.calls),
                args=args if self.keep_values or self.stop_at is not None else None,
                kwargs=kwargs if self.keep_values or self.stop_at is not None else None, info=info)
    if self.want_apply:
      call.apply, call.signature = make_apply()
    self.calls.append(call)
    if self.stop_at is not None and path == self.stop_at:
      raise _StopForward(call)
    return call

  def after(self, call: Call, output):
    if self.keep_values and (self.keep_output is None or self.keep_output(call.path)):
      call.output = output


def _linen_interceptor(recorder: _Recorder):

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    module = context.module

    def make_apply():
      unbound = module.clone(parent=None, name=None)
      others = {k: v for k, v in module.variables.items() if k != 'params'}
      others = jax.tree.map(lambda a: a, others)

      def apply(params, *a, **kw):
        return unbound.apply({'params': params, **others}, *a, **kw)
      # Equal (by fields) linen modules with equal non-param variables share one compiled step (those variables
      # are constants of the compiled function).
      return apply, ('linen', unbound, _digest(others))

    call = recorder.before(path_str(module.path), type(module).__name__, args, kwargs, make_apply,
                           _module_info(module))
    out = next_fun(*args, **kwargs)
    recorder.after(call, out)
    return out

  return interceptor


@contextlib.contextmanager
def _wrap_nnx_calls(make_wrapper, want=lambda path: True):
  """Wraps nnx.merge so that, inside, the ``__call__`` of every merged submodule whose path is ``want``ed is
  ``make_wrapper(original __call__, {id(module): path})``."""
  real_merge = nnx.merge
  patched: dict[type, Any] = {}
  paths: dict[int, str] = {}

  def merge(*a, **kw):
    root = real_merge(*a, **kw)
    for path, node in nnx.iter_graph(root):
      if isinstance(node, nnx.Module) and want(path_str(path)):
        paths[id(node)] = path_str(path)
        cls = type(node)
        if cls not in patched and '__call__' in vars(cls):
          patched[cls] = vars(cls)['__call__']
          cls.__call__ = make_wrapper(patched[cls], paths)
    return root

  nnx.merge = merge
  try:
    yield
  finally:
    nnx.merge = real_merge
    for cls, fn in patched.items():
      cls.__call__ = fn


def _nnx_interception(recorder: _Recorder):
  """Inside apply_fn, every merged nnx submodule reports its calls."""
  return _wrap_nnx_calls(lambda fn, paths: _nnx_call_wrapper(fn, recorder, paths))


def _nnx_call_wrapper(fn, recorder: _Recorder, paths: dict[int, str]):

  def wrapped(self, *args, **kwargs):
    path = paths.get(id(self))
    if path is None:
      return fn(self, *args, **kwargs)

    def make_apply():
      graphdef, params, rest = nnx.split(self, nnx.Param, ...)
      treedef = jax.tree.structure(nnx.to_pure_dict(params))

      def apply(p, *a, **kw):
        state = jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(p))
        return nnx.merge(graphdef, state, rest)(*a, **kw)
      return apply, ('nnx', graphdef, str(treedef), _digest(rest))

    call = recorder.before(path, type(self).__name__, args, kwargs, make_apply, _module_info(self))
    out = fn(self, *args, **kwargs)
    recorder.after(call, out)
    return out

  return wrapped


def _digest(tree) -> str:
  import hashlib  # pylint: disable=g-import-not-at-top
  h = hashlib.sha1()
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    arr = np.asarray(leaf)
    h.update(jax.tree_util.keystr(kp).encode() + str(arr.shape).encode() + str(arr.dtype).encode() + arr.tobytes())
  return h.hexdigest()


@contextlib.contextmanager
def intercept(recorder: _Recorder):
  with nn.intercept_methods(_linen_interceptor(recorder)), _nnx_interception(recorder):
    yield


@contextlib.contextmanager
def map_inputs(fns: dict[str, Callable]):
  """Inside, every call of a module whose '/'-joined path is a key of ``fns`` gets its first positional argument
  replaced by ``fns[path](arg)`` before the module runs (how activation quantizers sit at kernel inputs without
  touching model code). Paths are those ``apply_fn`` gives its modules (relative to the root, '' for the root)."""
  if not fns:
    yield
    return

  def interceptor(next_fun, args, kwargs, context):
    path = path_str(context.module.path)
    if context.method_name != '__call__' or path not in fns:
      return next_fun(*args, **kwargs)
    return next_fun(fns[path](_first_arg(path, args)), *args[1:], **kwargs)

  with _wrap_nnx_calls(lambda fn, paths: _nnx_input_wrapper(fn, fns, paths), want=lambda path: path in fns), \
      nn.intercept_methods(interceptor):
    yield


def _nnx_input_wrapper(fn, fns, paths):

  def wrapped(self, *args, **kwargs):
    path = paths.get(id(self))
    if path is None:
      return fn(self, *args, **kwargs)
    return fn(self, fns[path](_first_arg(path, args)), *args[1:], **kwargs)

  return wrapped


def _first_arg(path: str, args: tuple):
  if not args or not hasattr(args[0], 'shape'):
    raise ValueError(f'module {path!r} was called without an array as its first positional argument, so its input '
                     f'cannot be quantized; keep it float with Rule({path!r}, activation="float")')
  return args[0]


def trace_calls(apply_fn, params, batch, keep_output: Callable[[str], bool] | None = None
                ) -> tuple[list[Call], Any]:
  """Runs the model once (eagerly) and returns every submodule call with values, and the model output.
  ``keep_output(path)``: False for calls whose output is not kept (None: every output is), so that values nothing
  else holds are freed as the forward goes (a decoder's q, k, v and MLP products inside its layers)."""
  recorder = _Recorder(keep_values=True, keep_output=keep_output)
  with intercept(recorder):
    out = apply_fn(params, batch)
  return recorder.calls, out


def trace_call_shapes(apply_fn, params, batch) -> list[Call]:
  """``trace_calls`` without compute (``jax.eval_shape``): every submodule call, its array args and kwargs as
  ``jax.ShapeDtypeStruct`` (no values, no output, no apply)."""
  recorder = _Recorder(keep_values=True, want_apply=False)
  as_struct = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.Array) else x

  def run(p, b):
    with intercept(recorder):
      apply_fn(p, b)
    for c in recorder.calls:   # inside the trace: no tracer outlives it
      c.args, c.kwargs, c.output = jax.tree.map(as_struct, c.args), jax.tree.map(as_struct, c.kwargs), None

  jax.eval_shape(run, params, batch)
  return recorder.calls


def inputs_of(apply_fn, params, batch, path: str):
  """(args, kwargs) of the first call of module ``path`` when the model runs on ``batch``; stops right there."""
  recorder = _Recorder(keep_values=False, stop_at=path, want_apply=False)
  try:
    with intercept(recorder):
      apply_fn(params, batch)
  except _StopForward as stop:
    return stop.call.args, stop.call.kwargs
  raise ValueError(f'module {path!r} was not called by apply_fn on this batch')


# --------------------------------------------------------------------------------------------------- kernels ----

@dataclasses.dataclass(frozen=True)
class Kernel:
  """A quantizable weight: a 'kernel' param (rank >= 2) that feeds a dot_general or a convolution, or a param
  named by a ``WeightParam`` (``declared``)."""

  param_path: tuple               # keys of the leaf in the params tree (str, or int for nnx lists)
  module: str                     # '/'-joined module path
  shape: tuple[int, ...]
  view_shape: tuple[int, ...]     # what the quantizer sees: Dense (in, out) or Conv (..., in_per_group, out)
  is_conv: bool
  axes: tuple[int, ...] | None = None   # None: the view is the weight reshaped; else transpose(weight, axes) reshaped
  declared: bool = False          # named by a WeightParam (not a 'kernel')

  def to_view(self, w):
    """The weight ``w`` (of ``shape``) as the quantizer sees it (``view_shape``)."""
    return _layout.to_view(w, self.view_shape, self.axes)

  def from_view(self, v):
    """Inverse of ``to_view``."""
    return _layout.from_view(v, self.shape, self.axes)


def _view_shape(shape, cls_name: str, info: dict) -> tuple[tuple[int, ...], bool]:
  if 'Conv' in cls_name:
    return tuple(shape), True
  if len(shape) == 2:
    return tuple(shape), False
  features = info.get('features', info.get('out_features'))
  n_out = len(features) if isinstance(features, (tuple, list)) else 1
  n_in = len(shape) - n_out
  return (math.prod(shape[:n_in]), math.prod(shape[n_in:])), False


def _declared_view(name: str, shape: tuple[int, ...], in_axes) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
  """(view shape (in, out), axes or None) of a weight named by a WeightParam with ``in_axes``."""
  rank = len(shape)
  if rank < 2:
    raise ValueError(f'weight {name} has shape {shape}: a quantized weight needs rank >= 2 (input and output axes)')
  if in_axes is None:
    if rank != 2:
      raise ValueError(f'weight {name} has shape {shape}: its layout is ambiguous; give its WeightParam in_axes (the '
                       f'axes contracted with the input), or WeightParam.einsum(pattern, equation)')
    in_axes = (0,)
  if any(a >= rank for a in in_axes) or len(in_axes) >= rank:
    raise ValueError(f'weight {name} has shape {shape}: WeightParam in_axes={tuple(in_axes)} must be some of its '
                     f'{rank} axes, leaving at least one output axis')
  axes = tuple(in_axes) + tuple(a for a in range(rank) if a not in in_axes)
  view = (math.prod(shape[a] for a in in_axes), math.prod(shape[a] for a in axes[len(in_axes):]))
  return view, None if axes == tuple(range(rank)) else axes


def find_kernels(params, calls: list[Call], skip: Callable[[str], bool] = lambda module: False,
                 weight_params=()) -> list[Kernel]:
  """Every quantizable kernel of ``params`` whose module is not ``skip``ped, in params order: 'kernel' params of
  rank >= 2 and the params ``weight_params`` (``config.WeightParam``s) name. ValueError naming the WeightParam when
  it names no param of a matching module."""
  by_path = {}
  for c in calls:
    by_path.setdefault(c.path, c)
  kernels, used = [], set()
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = treepath.path_names(key_path)
    module = path_str(names[:-1])
    declared = None
    if names[-1] != 'kernel':
      declared = next((wp for wp in weight_params if wp.name == names[-1] and wp.matches(module)), None)
      if declared is None:
        continue
      used.add(declared)
    elif np.ndim(leaf) < 2:
      continue
    if skip(module):
      continue
    call = by_path.get(module)
    if call is None:
      raise ValueError(f'kernel {path_str(names)} belongs to module {module!r}, which apply_fn never called; '
                       f'keep it float with a rule: QuantConfig(rules=[Rule({module!r}, skip=True)])')
    if declared is None:
      view, is_conv = _view_shape(np.shape(leaf), call.cls_name, call.info)
      kernels.append(Kernel(names, module, tuple(np.shape(leaf)), view, is_conv))
    else:
      view, axes = _declared_view(path_str(names), tuple(np.shape(leaf)), declared.in_axes)
      kernels.append(Kernel(names, module, tuple(np.shape(leaf)), view, False, axes, declared=True))
  for wp in weight_params:
    if wp not in used:
      modules = [c.path for c in calls if wp.matches(c.path)]
      raise ValueError(f'WeightParam({wp.pattern!r}, {wp.name!r}) names no param: '
                       + (f'no module path matches {wp.pattern!r} (re.fullmatch)' if not modules else
                          f'none of the {len(modules)} matching modules ({modules[:5]}) has a param {wp.name!r}'))
  return kernels
