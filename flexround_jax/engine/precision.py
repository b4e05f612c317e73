"""The precision of the reconstruction's matmuls and convolutions (``QuantConfig.compute_dtype``).

``cast_matmuls(fn, 'bfloat16')`` is ``fn`` with every float32 ``dot_general`` and ``conv_general_dilated`` it
traces taking bfloat16 operands and accumulating and returning float32 (``preferred_element_type``), the way
mixed-precision training runs them. It works on the traced program (the jaxpr), so any model, Flax linen or NNX,
Dense, Einsum or hand-written ``jnp.einsum``, is covered without touching its code; everything else (the fake-quant
kernel, quantizer state, optimizer moments, losses, targets) stays float32.

Wrapping a whole training step (``value_and_grad`` and the update) casts the backward products too, so the gradient
reaches the float32 kernel straight through the cast (the cast's transpose is a cast back). Products the code
asked for at an explicit ``precision`` (``Precision.HIGHEST``: GPTQ's Hessian, LRQ's low-rank scale) stay float32,
as on TPUs and GPUs, where an explicit precision overrides the default.

On CPU each product is laid out as XLA's fused matmul kernels (oneDNN / YNNPACK) take it, batch x rows x contracted
times batch x contracted x columns, behind optimization barriers: XLA's CPU runtime multiplies bfloat16 into float32
only in those kernels, and fails at run time on a product it left elsewhere. Only a float32 product with bfloat16
operands and ``preferred_element_type=float32`` is fast there: a bfloat16 result (no float32 accumulation) is slower
than float32, and XLA's CPU backend ignores ``DotAlgorithmPreset.BF16_BF16_F32`` (measured:
benchmarks/bench_bf16.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

DTYPES = ('float32', 'bfloat16')
_PRODUCTS = frozenset({'dot_general', 'conv_general_dilated'})
# Call-like primitives whose body is evaluated in place (under the caller's jit nothing is lost).
_INLINE = {'jit': 'jaxpr', 'pjit': 'jaxpr', 'closed_call': 'call_jaxpr', 'core_call': 'call_jaxpr',
           'custom_jvp_call': 'call_jaxpr', 'custom_vjp_call': 'call_jaxpr', 'custom_vjp_call_jaxpr': 'fun_jaxpr',
           'remat2': 'jaxpr', 'checkpoint': 'jaxpr'}


def cast_matmuls(fn, dtype: str):
  """``fn`` (a function of arrays / pytrees) with its default-precision float32 matmuls and convolutions run on
  ``dtype`` operands with float32 accumulation and outputs; ``fn`` itself for 'float32'."""
  if dtype not in DTYPES:
    raise ValueError(f'compute dtype must be one of {DTYPES}, got {dtype!r}')
  if dtype == 'float32':
    return fn
  low = jnp.dtype(dtype)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    closed, out_shape = jax.make_jaxpr(functools.partial(fn, **kwargs), return_shape=True)(*args)
    out = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args), low)
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)
  return wrapped


def _castable(eqn) -> bool:
  if eqn.primitive.name not in _PRODUCTS or eqn.params.get('precision') not in (None, (None, None)):
    return False
  dtypes = [v.aval.dtype for v in eqn.invars] + [eqn.outvars[0].aval.dtype]
  return all(d == jnp.float32 for d in dtypes)


def _eval(jaxpr, consts, args, low) -> list:
  env = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if _castable(eqn) and name == 'dot_general' and jax.default_backend() == 'cpu':
      outvals = _canonical_dot(*[x.astype(low) for x in invals], eqn.params['dimension_numbers'])
    elif _castable(eqn):
      params = dict(eqn.params, preferred_element_type=jnp.dtype(jnp.float32))
      outvals = eqn.primitive.bind(*[x.astype(low) for x in invals], **params)
    elif name in _INLINE and _INLINE[name] in eqn.params:
      body = eqn.params[_INLINE[name]]
      if isinstance(body, jcore.ClosedJaxpr):
        outvals = _eval(body.jaxpr, body.consts, invals, low)
      else:
        outvals = _eval(body, [], invals, low)
    else:
      params = {k: _rewrite(v, low) for k, v in eqn.params.items()}
      outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
    if not eqn.primitive.multiple_results:
      outvals = [outvals]
    for v, x in zip(eqn.outvars, outvals):
      if not isinstance(v, jcore.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _canonical_dot(lhs, rhs, dimension_numbers):
  """``dot_general(lhs, rhs, dimension_numbers)`` with float32 accumulation and output, its operands laid out as
  (batch, rows, contracted) and (batch, contracted, columns): XLA's CPU runtime multiplies bfloat16 into float32
  only in its fused matmul kernels, which take that layout; a product left in another one fails at run time
  ('Unsupported element type for DotThunk'). Same result and output layout as the plain ``dot_general``."""
  (lc, rc), (lb, rb) = dimension_numbers
  lf = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
  rf = [d for d in range(rhs.ndim) if d not in rc and d not in rb]
  size = lambda x, dims: int(np.prod([x.shape[d] for d in dims], dtype=np.int64))
  b, m, k, n = size(lhs, lb), size(lhs, lf), size(lhs, lc), size(rhs, rf)
  a = _laid_out(lhs, (*lb, *lf, *lc), (b, m, k))
  c = _laid_out(rhs, (*rb, *rc, *rf), (b, k, n))
  out = jax.lax.dot_general(a, c, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
  out = jax.lax.optimization_barrier(out)   # nor may it fold a transpose of the result into the product
  shape = [lhs.shape[d] for d in lb] + [lhs.shape[d] for d in lf] + [rhs.shape[d] for d in rf]
  return out.reshape(shape)


def _laid_out(x, perm, shape):
  """``x`` transposed by ``perm`` and reshaped; a real transpose is materialized (an optimization barrier), or XLA
  folds it back into the product's dimension numbers."""
  if tuple(perm) != tuple(range(x.ndim)):
    x = jax.lax.optimization_barrier(jnp.transpose(x, perm))
  return x.reshape(shape)


def _rewrite(value, low):
  """A closed jaxpr param (a scan / while body, cond branches) with its products cast; anything else as it is."""
  if isinstance(value, tuple) and value and all(isinstance(v, jcore.ClosedJaxpr) for v in value):
    return tuple(_rewrite(v, low) for v in value)
  if not isinstance(value, jcore.ClosedJaxpr) or not _has_products(value.jaxpr):
    return value
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in value.in_avals]
  new = jax.make_jaxpr(lambda *a: _eval(value.jaxpr, value.consts, list(a), low))(*avals)
  return value if len(new.consts) != len(value.consts) else new   # a body that grew constants stays as it was


def _has_products(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _PRODUCTS:
      return True
    for sub in _subjaxprs(eqn):
      if _has_products(sub):
        return True
  return False


def _subjaxprs(eqn):
  for v in eqn.params.values():
    for item in (v if isinstance(v, tuple) else (v,)):
      if isinstance(item, jcore.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jcore.Jaxpr):
        yield item
