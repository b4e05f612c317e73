"""qwix export: QTensors as the prequantized params of a qwix PTQ model, for JAX serving on TPU / GPU.

qwix (``pip install qwix``, Google's JAX quantization library) quantizes a Flax model by rules (regexes on module
paths). Its PTQ model reads each quantized kernel from the params as ``WithAux(QArray(qvalue, scale, zero_point),
how)`` and its dot_general computes with the kernel ``(qvalue - zero_point) * scale``, the scale repeated over tiles.
qwix itself only rounds to nearest (RTN, GPTQ, AWQ); here it is handed the codes and grids a method learned:

  rules = fr.export.qwix_rules(params, qtensors)       # weight-only rules on the exact module paths
  qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
  abstract = jax.eval_shape(qmodel.init, jax.random.key(0), *example_inputs)['params']
  qparams = fr.export.to_qwix_params(params, qtensors, abstract)
  qmodel.apply({'params': qparams}, *inputs)           # ptq_model() does the first four steps

nnx models (``params`` an nnx ``State``, e.g. ``QuantizeResult.params``): qwix quantizes the module itself, running it
once on example inputs, and the params go in with ``nnx.update``:

  qmodel = qwix.quantize_model(model, qwix.PtqProvider(fr.export.qwix_rules(params, qtensors)), *example_inputs)
  nnx.update(qmodel, fr.export.to_qwix_params(params, qtensors, qmodel))
  qmodel(*inputs)                                      # ptq_model(model, params, qtensors, *example_inputs) does this

Kernels (linen and nnx): Dense (in, out), DenseGeneral (in axes..., out axes...) = our view (prod in, prod out).

  our grid                 qwix rule                                    QArray (kernel shape)
  symmetric, b bits        weight_qtype int4 / int8 (b = 4 / 8), else   qvalue = codes, no zero point
                           'int{b}' (qwix stores int2/3 as int4, int5-7 as int8)
  asymmetric, b bits       weight_qtype int4 (b <= 4) / int8, 'minmax'  qvalue = codes - 2**(b-1),
                           (qwix's asymmetric types are int4 and int8)  zero_point = zero_point - 2**(b-1) (int4/int8)
  per_tensor, per_channel  tile_size None                               scale (1, ..., out), one per output channel
                                                                        (per tensor: the one step repeated)
  per_group, group g       tile_size t = gcd(g, in) on the input axis   scale (in / t, out): each group's step repeated
                           (t = g when g divides in)                    g / t times (a shorter last group too)

qwix's scale is a step like ours, not its inverse: it quantizes ``round(w / scale) + zero_point`` and dequantizes
``(qvalue - zero_point) * scale``. Values are copied, never recomputed: ``qvalue - zero_point`` is ``codes -
zero_point`` and the scales are our float32 steps, so qwix dequantizes to exactly ``QTensor.dequantize()``, bit for
bit in float32. An abstract scale of another dtype (a bfloat16 / float16 model) takes our steps only where they are
exact in it (``QuantSpec.scale_dtype``), else ValueError.

What qwix cannot hold (ValueError naming the kernel; with ``float_fallback=True`` the kernel gets no rule and
``to_qwix_params`` writes its dequantized float kernel instead, so the model still computes the same function):
  - convolution kernels: qwix PTQ quantizes a convolution's input to the weight type too (``act_qtype`` must equal
    ``weight_qtype``); there is no weight-only convolution;
  - per-group grids of kernels with several input axes (DenseGeneral ``axis=(-2, -1)``): qwix tiles only the last
    contracting axis and keeps one scale across the others.

Numerics: with ``act_qtype=None`` (weight-only, the default) qwix's dot_general gets float activations and takes its
dequantize-first path (the float kernel above, then the same float dot_general), so outputs equal the fake-quantized
model's (``dequantize_params``); measured on CPU: bit for bit, jitted and not. ``act_qtype=jnp.int8`` also quantizes
the activations (dynamic absmax per token; the matmul is integer where the weight is per channel or tiles >= 128):
a different function from the one the method reconstructed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import TYPE_CHECKING

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from flexround_jax import _extras
from flexround_jax import _layout
from flexround_jax import qtensor as qtensor_lib
from flexround_jax import treepath
from flexround_jax.export import grid
from flexround_jax.qtensor import QTensor
from flexround_jax.spec import QuantSpec

if TYPE_CHECKING:
  import qwix


def _qwix():
  return _extras.require('qwix', 'qwix', 'the qwix export')


def _ptq():
  # WithAux is not re-exported by qwix 0.1.8
  return _extras.require('qwix._src.providers.ptq', 'qwix', 'the qwix export')


def _weight_qtype(spec: QuantSpec):
  """(qwix weight_qtype, weight_calibration_method) of the rule that holds ``spec``'s codes."""
  if not spec.symmetric:
    return (jnp.int4 if spec.bits <= 4 else jnp.int8), 'minmax'
  return {4: jnp.int4, 8: jnp.int8}.get(spec.bits, f'int{spec.bits}'), 'absmax'


def _tile_size(name: str, qt: QTensor, kernel_shape: tuple[int, ...]) -> int | None:
  """qwix tile_size for ``qt`` (None: one scale per output channel); ValueError naming ``name`` if qwix cannot
  hold the grid."""
  view = tuple(qt.codes.shape)
  if len(view) > 2:
    raise ValueError(f'kernel {name!r}: convolution kernels cannot be exported to qwix: its PTQ convolution quantizes '
                     f'the input to the weight type too (act_qtype == weight_qtype), it has no weight-only mode')
  spec = qt.spec
  if spec.granularity != 'per_group' or _layout.n_groups(view[0], spec.group_size) == 1:
    return None
  in_axes = next((k for k in range(1, len(kernel_shape)) if math.prod(kernel_shape[:k]) == view[0]), None)
  if in_axes != 1:
    raise ValueError(f'kernel {name!r}: a per-group grid (group_size={spec.group_size}) on a kernel of shape '
                     f'{kernel_shape} with several input axes cannot be exported to qwix, which tiles only the last '
                     f'contracting axis; quantize this kernel per channel or keep it float')
  return math.gcd(spec.group_size, view[0])


def qwix_rules(params, qtensors: dict[str, QTensor], *, act_qtype=None,
               float_fallback: bool = False) -> list[qwix.QuantizationRule]:
  """qwix rules that quantize exactly the kernels of ``qtensors`` (module paths ``re.escape``d, one rule per
  (weight_qtype, calibration, tile_size)), weight-only unless ``act_qtype`` is given (e.g. ``jnp.int8``).

  ``params``: the float params the QTensors were made from (linen, without the 'params' collection key, or an nnx
  ``State``); its kernel shapes place per-group tiles. ValueError naming the kernels qwix cannot hold (see the module
  docstring), or, with ``float_fallback``, those kernels get no rule.
  """
  flat = treepath.flatten_params(params)
  configs: dict[tuple, list[str]] = {}
  module_config: dict[str, tuple] = {}
  problems = []
  for name in sorted(qtensors):
    if name not in flat:
      raise ValueError(f'qtensors names kernel {name!r}, which is not in params')
    qt = qtensor_lib.validate(qtensors[name], f'kernel {name!r}')
    try:
      tile = _tile_size(name, qt, tuple(np.shape(flat[name])))
    except ValueError as e:
      problems.append(str(e))
      continue
    module = name.rpartition('/')[0]
    config = (*_weight_qtype(qt.spec), tile)
    if module_config.setdefault(module, config) != config:
      raise ValueError(f'kernel {name!r}: module {module!r} holds quantized kernels with different grids; a qwix rule '
                       f'applies to a whole module')
    if module not in configs.setdefault(config, []):
      configs[config].append(module)
  if problems and not float_fallback:
    raise ValueError('; '.join(problems) + ' (float_fallback=True keeps these kernels float)')
  return [_qwix().QuantizationRule(module_path='(?:' + '|'.join(re.escape(m) for m in modules) + ')',
                                weight_qtype=qtype, weight_calibration_method=calibration, tile_size=tile,
                                act_qtype=act_qtype)
          for (qtype, calibration, tile), modules in configs.items()]


def _qtype_bounds(name: str, qtype) -> tuple[int, int]:
  """Integer range of qwix's logical ``qtype`` ('int3' or an integer dtype)."""
  if isinstance(qtype, str) and re.fullmatch(r'int[2-8]', qtype):
    bits = int(qtype[3:])
    return -2 ** (bits - 1), 2 ** (bits - 1) - 1
  try:
    info = jnp.iinfo(qtype)
  except ValueError as e:
    raise ValueError(f'kernel {name!r}: qwix quantizes it as {qtype!r}, not an integer grid; our codes need an '
                     f'integer weight_qtype') from e
  return int(info.min), int(info.max)


def _pool(full: np.ndarray, grid_shape: tuple[int, ...], name: str, field: str, spec: QuantSpec) -> np.ndarray:
  """``full`` (qwix kernel shape) reduced to qwix's ``grid_shape``; ValueError naming ``name`` unless ``full`` is
  constant over every tile of that grid."""
  split = [d for n, g in zip(full.shape, grid_shape) for d in (g, n // g)]
  tiles = full.reshape(split)
  first = tiles[tuple(slice(None) if i % 2 == 0 else slice(0, 1) for i in range(tiles.ndim))]
  if not np.array_equal(tiles, np.broadcast_to(first, tiles.shape)):
    raise ValueError(f'kernel {name!r}: its {field} ({spec.granularity}, group_size={spec.group_size}) varies inside '
                     f"the tiles of qwix's {field} shape {grid_shape}; use the rules of qwix_rules for this kernel")
  return first.reshape(grid_shape)


def _qarray(name: str, qt: QTensor, kernel_shape: tuple[int, ...], abstract: qwix.QArray) -> qwix.QArray:
  """``abstract`` (qwix's QArray of ShapeDtypeStructs) filled from ``qt``; exact, or ValueError naming ``name``."""
  spec, shape = qt.spec, tuple(abstract.qvalue.shape)
  if math.prod(shape) != qt.codes.size or math.prod(kernel_shape) != qt.codes.size:
    raise ValueError(f'kernel {name!r}: qwix holds it as {shape}, params as {kernel_shape}, the QTensor as '
                     f'{tuple(qt.codes.shape)}: sizes differ')
  codes = np.asarray(qt.codes).astype(np.int32)
  n_in = codes.shape[-2]
  # view -> kernel -> qwix's compute shape, C order throughout (as dequantize_params and qwix.quantize_params)
  full = lambda grid_param: np.broadcast_to(_layout.expand(np.asarray(grid_param), spec, n_in), codes.shape)
  scale = full(qt.scale).reshape(shape)
  zero_point = full(qt.zero_point).astype(np.int32).reshape(shape)
  codes = codes.reshape(shape)
  if abstract.zero_point is None:   # a symmetric rule: the centred integers codes - zero_point must fit its type
    qvalue, zero_point = codes - zero_point, None
  else:
    shift = 0 if spec.symmetric else 2 ** (spec.bits - 1)
    qvalue, zero_point = codes - shift, zero_point - shift
  lo, hi = _qtype_bounds(name, abstract.qtype)
  for field, values in (('codes', qvalue), ('zero points', zero_point)):
    if values is not None and values.size and (values.min() < lo or values.max() > hi):
      raise ValueError(f"kernel {name!r}: its {field} span [{values.min()}, {values.max()}] in qwix's "
                       f'{abstract.qtype!r} {"zero-point" if abstract.zero_point is not None else "symmetric"} '
                       f'form, outside [{lo}, {hi}]; use the rules of qwix_rules for this kernel')
  scale = _pool(scale, tuple(abstract.scale.shape), name, 'scale', spec)
  if not grid.scales_exact(scale, abstract.scale.dtype).all():
    raise ValueError(f"kernel {name!r}: its float32 scales are not exact in qwix's scale dtype "
                     f'{np.dtype(abstract.scale.dtype).name}; quantize with QuantSpec(scale_dtype=...) of that dtype')
  cast = scale.astype(abstract.scale.dtype)
  if zero_point is not None:
    zero_point = jnp.asarray(_pool(zero_point, tuple(abstract.zero_point.shape), name, 'zero point', spec)
                             .astype(abstract.zero_point.dtype))
  return dataclasses.replace(abstract, qvalue=jnp.asarray(qvalue.astype(abstract.qvalue.dtype)),
                             scale=jnp.asarray(cast), zero_point=zero_point)


def to_qwix_params(params, qtensors: dict[str, QTensor], abstract_quantized_params, *, float_fallback: bool = False):
  """Params for the qwix PTQ model: every kernel qwix quantizes (a ``WithAux`` leaf of ``abstract_quantized_params``)
  filled from its QTensor, every other leaf taken from ``params``.

  ``params``: the float params (linen, without the 'params' key, or an nnx ``State``). ``abstract_quantized_params``,
  linen: the 'params' of ``jax.eval_shape(qwix_model.init, ...)`` (any tree of the PTQ model's params with WithAux
  leaves); returns a tree of that structure, jax arrays throughout. nnx: the PTQ model itself (from
  ``qwix.quantize_model``, or abstract from ``nnx.eval_shape``), as for ``qwix.quantize_params``; returns the pure
  dict of its ``nnx.Param`` state (``nnx.to_pure_dict(nnx.state(qmodel, nnx.Param))``'s structure) for
  ``nnx.update(qmodel, ...)``. ValueError naming the leaf when a quantized kernel has no QTensor, a
  QTensor's kernel is not quantized by qwix (unless ``float_fallback``: then its dequantized float kernel is written),
  the trees differ, or a grid does not fit qwix's (codes outside its type, scales varying inside its tiles or not
  exact in its scale dtype).
  """
  flat = treepath.flatten_params(params)
  named, rebuild = _abstract_params(abstract_quantized_params)
  out, seen = [], set()
  for name, abstract in named:
    if name not in flat:
      raise ValueError(f'qwix param {name!r} is not in params')
    seen.add(name)
    leaf = flat[name]
    if isinstance(abstract, _ptq().WithAux):
      if name not in qtensors:
        raise ValueError(f'qwix quantizes kernel {name!r}, which has no QTensor: its module matches a rule that '
                         f'qwix_rules would not write')
      qt = qtensor_lib.validate(qtensors[name], f'kernel {name!r}')
      if qt.axes is not None:
        raise ValueError(f'kernel {name!r} was quantized on a transposed view (QTensor.axes={qt.axes}, a WeightParam '
                         f'weight), which this export does not write; use save_safetensors or save_orbax')
      out.append(abstract.replace(array=_qarray(name, qt, tuple(np.shape(leaf)), abstract.array)))
    elif name in qtensors:
      if not float_fallback:
        raise ValueError(f'kernel {name!r} has a QTensor but qwix does not quantize it (no rule matches its module); '
                         f'use qwix_rules, or float_fallback=True to write its dequantized float kernel')
      dtype = jnp.asarray(leaf).dtype
      out.append(jnp.asarray(qtensors[name].to_weight(np.shape(leaf), dtype)))
    elif tuple(np.shape(leaf)) != tuple(abstract.shape):
      raise ValueError(f'param {name!r}: shape {np.shape(leaf)} in params, {tuple(abstract.shape)} in the qwix model')
    else:
      out.append(jnp.asarray(leaf))   # qwix's PTQ promote_dtype drops numpy arrays outside jit
  for what, names in (('params', flat), ('qtensors', qtensors)):
    missing = sorted(set(names) - seen)
    if missing:
      raise ValueError(f'{what} hold {missing[:5]} ({len(missing)} in all), which the qwix model does not have')
  return rebuild(out)


def _abstract_params(abstract):
  """([(param name, abstract leaf or unboxed WithAux)], rebuild: values in that order -> the tree to_qwix_params
  returns) of a linen params tree or an nnx PTQ model."""
  with_aux = _ptq().WithAux
  if not isinstance(abstract, nnx.Module):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract), is_leaf=lambda x: isinstance(x, with_aux))
    named = [(treepath.path_str(treepath.path_names(kp)), leaf) for kp, leaf in leaves]
    return named, functools.partial(jax.tree_util.tree_unflatten, treedef)
  aux = {treepath.path_str(p): node.value for p, node in nnx.iter_graph(abstract) if isinstance(node, with_aux)}
  pure = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))   # a WithAux kernel: '<kernel>/array/{qvalue,scale,...}'
  leaves = treepath.flatten(pure)
  names = list(leaves)
  under_aux = lambda name: any(name.startswith(a + '/') for a in aux)
  named = [(n, leaf) for n, leaf in leaves.items() if not under_aux(n)] + list(aux.items())

  def rebuild(values):
    flat = {}
    for (name, _), value in zip(named, values):
      if name in aux:
        flat.update({f'{name}/{sub}': v for sub, v in treepath.flatten(value).items()})
      else:
        flat[name] = value
    if set(flat) != set(names):
      raise ValueError(f'the qwix model holds {sorted(set(names) ^ set(flat))[:5]} in another form than its '
                       f'WithAux kernels (qwix version?)')
    return jax.tree.unflatten(jax.tree.structure(pure), [flat[n] for n in names])

  return named, rebuild


def ptq_model(model: nn.Module | nnx.Module, params, qtensors: dict[str, QTensor], *example_inputs, act_qtype=None,
              float_fallback: bool = False, **example_kwargs) -> tuple[nn.Module | nnx.Module, dict]:
  """(qwix PTQ model, its params) of ``model``: ``qwix_rules``, ``qwix.quantize_model``, ``to_qwix_params``.

  linen: the abstract params come from ``jax.eval_shape`` of the PTQ model's init on ``example_inputs`` (nothing is
  computed); run it as ``qmodel.apply({'params': qparams}, *inputs)``. nnx (``params`` the model's nnx ``State``):
  qwix runs a copy of ``model`` once on ``example_inputs`` to build the PTQ model, which already holds ``qparams``
  (``nnx.update``) when returned; run it as ``qmodel(*inputs)``.
  """
  qwix = _qwix()
  rules = qwix_rules(params, qtensors, act_qtype=act_qtype, float_fallback=float_fallback)
  if isinstance(model, nnx.Module):
    qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules), *example_inputs, **example_kwargs)
    qparams = to_qwix_params(params, qtensors, qmodel, float_fallback=float_fallback)
    nnx.update(qmodel, qparams)
    return qmodel, qparams
  qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
  init = functools.partial(qmodel.init, jax.random.key(0))
  abstract = jax.eval_shape(init, *example_inputs, **example_kwargs)['params']
  return qmodel, to_qwix_params(params, qtensors, abstract, float_fallback=float_fallback)
