"""float32 against bfloat16 compute (``QuantConfig.compute_dtype``) on this machine, same process.

Rows:
  * a (1024 x 576) . (576 x 1536) matmul (SmolLM2's MLP shape at 1024 tokens) in GFLOP/s: float32; bfloat16
    operands accumulated into float32 (``preferred_element_type``, what compute_dtype='bfloat16' runs); bfloat16
    operands with a bfloat16 result; and float32 with ``DotAlgorithmPreset.BF16_BF16_F32`` (XLA's own way to ask).
  * the SmolLM2-135M decoder layer's FlexRound step (batch 2 x 512 tokens, W4 per-channel, 1 device, 12 steps per
    dispatch as a 250-step unit runs them; the engine's ``make_train_step``, as benchmarks/bench_engine.py), and
    the same layer quantized end to end by ``fr.quantize`` (one block, ``--iters`` steps, 8 calibration samples):
    its training seconds per step (compilation included) and the unit's other seconds (the fixed cost: targets,
    the RTN reference, the final loss), with and without ``fallback_samples``.

The host's bf16 hardware flags (``avx512_bf16``, ``amx_bf16``) are recorded: without them XLA emulates bfloat16
products and the rows show no gain. Writes benchmarks/results/bf16_<backend>.json.

  python benchmarks/bench_bf16.py [--repeats 10] [--iters 48] [--note "..."]
"""

import argparse
import json
import os
import re
import resource
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument('--repeats', type=int, default=10)
parser.add_argument('--iters', type=int, default=48)
parser.add_argument('--note', default='')
args = parser.parse_args()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import flexround_jax as fr  # noqa: E402
from flexround_jax import provenance  # noqa: E402
from flexround_jax.models import llama  # noqa: E402

DTYPES = ('float32', 'bfloat16')


def median_time(fn, repeats):
  jax.block_until_ready(fn())  # compile / warm
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def bf16_flags() -> list[str]:
  try:
    with open('/proc/cpuinfo') as f:
      return sorted(set(re.findall(r'\b(amx_bf16|avx512_bf16)\b', f.read())))
  except OSError:
    return []


def matmul_rows(repeats):
  m, k, n = 1024, 576, 1536
  a = jax.random.normal(jax.random.key(0), (m, k))
  b = jax.random.normal(jax.random.key(1), (k, n))
  bf = jnp.bfloat16
  cases = {
      'float32 x float32 -> float32': lambda x, y: x @ y,
      'bfloat16 x bfloat16 -> float32 (preferred_element_type)':
          lambda x, y: jax.lax.dot(x.astype(bf), y.astype(bf), preferred_element_type=jnp.float32),
      'bfloat16 x bfloat16 -> bfloat16': lambda x, y: x.astype(bf) @ y.astype(bf),
      'float32, precision=BF16_BF16_F32':
          lambda x, y: jnp.matmul(x, y, precision=jax.lax.DotAlgorithmPreset.BF16_BF16_F32),
  }
  exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  rows = []
  for name, fn in cases.items():
    f = jax.jit(fn)
    t = median_time(lambda: f(a, b), repeats * 5)
    err = float(np.max(np.abs(np.asarray(f(a, b), np.float64) - exact)) / np.max(np.abs(exact)))
    rows.append({'matmul': f'({m}x{k}).({k}x{n})', 'operands': name, 'ms': round(t * 1e3, 3),
                 'gflops': round(2 * m * k * n / t / 1e9, 1), 'max_rel_error': float(f'{err:.3g}')})
    print(json.dumps(rows[-1]), flush=True)
  return rows


class Wrap(nn.Module):
  block: nn.Module

  @nn.compact
  def __call__(self, x):
    return self.block(x)   # a module attribute becomes the child named 'block'


def smollm2_layer():
  return llama.DecoderLayer(llama.LlamaConfig(vocab_size=49152, dim=576, n_layers=1, n_heads=9, n_kv_heads=3,
                                              head_dim=64, ffn_dim=1536, rope_base=100000.0))


def step_row(compute_dtype, repeats, k_steps=12):
  """Per-step time of the engine's jitted K-step FlexRound function on the SmolLM2 layer, batch 2 x 512."""
  x = jax.random.normal(jax.random.key(4), (2, 512, 576))
  model = Wrap(smollm2_layer())
  params = model.init(jax.random.key(1), x[:1])['params']
  apply_fn = lambda p, b: model.apply({'params': p}, b)
  cfg = fr.QuantConfig(method='flexround', weight=fr.QuantSpec(4), blocks='block', iters=250, batch_size=2,
                       num_devices=1, progress=False, compute_dtype=compute_dtype)
  unit = fr.engine.plan_units(apply_fn, params, np.asarray(x), cfg)[0]
  fp_unit = params['block']
  views = fr.engine.kernel_views(unit, fp_unit)
  split = [m.split(m.start(v, s)) for m, v, s in zip(unit.methods, views, unit.specs)]
  trainable, frozen = [t for t, _ in split], [f for _, f in split]
  steps, opt = fr.engine.make_train_step(unit, cfg.iters, 0.0, compute_dtype)
  state = {'t': trainable, 'o': opt.init(trainable)}
  y = apply_fn(params, x)
  xs, ys = [jnp.stack([x] * k_steps)], [jnp.stack([y] * k_steps)]
  extra = (jnp.zeros((k_steps,)), jax.random.key(0), jnp.int32(0))

  def call():
    t, o, losses = steps(state['t'], state['o'], frozen, fp_unit, xs, ys, *extra)
    state['t'], state['o'] = t, o
    return losses
  t = median_time(call, max(3, repeats)) / k_steps
  row = {'block': 'smollm2_layer_576_seq512_b2', 'granularity': 'per_channel', 'compute_dtype': compute_dtype,
         'steps_per_dispatch': k_steps, 'step_ms': round(t * 1e3, 2),
         'tokens_per_s': round(2 * 512 / t, 1)}
  print(json.dumps(row), flush=True)
  return row


def quantize_row(compute_dtype, iters, fallback_samples=None):
  """The SmolLM2 layer as a one-block model quantized by ``fr.quantize`` (8 calibration samples of 512 tokens,
  batch 2): training seconds per step (compilation included) and the unit's fixed seconds (all but training)."""
  calib = jax.random.normal(jax.random.key(5), (8, 512, 576))
  model = Wrap(smollm2_layer())
  params = model.init(jax.random.key(1), calib[:1])['params']
  apply_fn = lambda p, b: model.apply({'params': p}, b)
  cfg = fr.QuantConfig(method='flexround', weight=fr.QuantSpec(4), blocks='block', iters=iters, batch_size=2,
                       num_devices=1, progress=False, compute_dtype=compute_dtype, eval_batch_size=4,
                       fallback_samples=fallback_samples)
  t0 = time.perf_counter()
  result = fr.quantize(params, apply_fn, calib, cfg)
  wall = time.perf_counter() - t0
  rep = next(r for r in result.report if r['unit'] == 'block')
  row = {'block': 'smollm2_layer_576_seq512', 'via': 'fr.quantize', 'compute_dtype': compute_dtype,
         'fallback_samples': fallback_samples, 'calib_samples': 8, 'iters': iters,
         'seconds_train': rep['seconds_train'], 'train_s_per_step_incl_compile': round(rep['seconds_train'] / iters, 3),
         'unit_seconds': rep['seconds'], 'fixed_seconds': round(rep['seconds'] - rep['seconds_train'], 3),
         'loss_rtn': rep['loss_rtn'], 'loss_final': rep['loss_final'], 'wall_s': round(wall, 2)}
  print(json.dumps(row), flush=True)
  return row


def main():
  out = {'machine': {**provenance.host_info(), 'jax': jax.__version__, 'bf16_cpu_flags': bf16_flags(),
                     'load_average_at_start': os.getloadavg()},
         'note': args.note}
  print(json.dumps(out), flush=True)
  out['matmul'] = matmul_rows(args.repeats)
  out['step'] = [step_row(d, args.repeats) for d in DTYPES]
  out['step_speedup_bf16'] = round(out['step'][0]['step_ms'] / out['step'][1]['step_ms'], 2)
  out['quantize'] = [quantize_row(d, args.iters) for d in DTYPES] + [quantize_row('bfloat16', args.iters, 2)]
  out['machine']['load_average_at_end'] = os.getloadavg()
  out['peak_rss_mb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  path = os.path.join(os.path.dirname(__file__), 'results', f'bf16_{jax.default_backend()}.json')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(out, f, indent=2)
  print(f'bf16 step speed-up {out["step_speedup_bf16"]}x; wrote {path}')


if __name__ == '__main__':
  sys.exit(main())
