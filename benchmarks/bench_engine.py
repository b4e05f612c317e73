"""Speed of the engine's compiled reconstruction step on this machine.

For a standard ResNet basic block (64 channels, 32x32, batch 32), a 512-wide transformer layer (8 heads,
sequence 128, batch 8) and a SmolLM2-135M decoder layer (width 576, 9 query / 3 KV heads, SwiGLU 1536, sequence
512, batch 2: the LLM experiment's step), measures the jitted FlexRound training step (fake-quantize every
kernel, forward, backward, Adam; K steps per dispatch as the engine runs them, K = 12 for a 250-step unit) with the
calibration batch on 1 device and sharded over N devices (N = CPU cores, simulated CPU devices), and compares the
achieved GFLOP/s (XLA's own flop count of one step) with a same-process float32 matmul peak. For the SmolLM2 layer
it also times, in the same process, one step per dispatch and the attention layout used before issue 18 (the
baselines of the speed-ups), and batches 4 and 8. The SmolLM2 layer is timed per-channel and per-group 128 (576
inputs: 4 x 128 + 64), so the cost of per-group grids is a ratio within one run. Writes
benchmarks/results/engine_<backend>.json.

  python benchmarks/bench_engine.py [--devices N] [--repeats 20]
"""

import argparse
import json
import os
import resource
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument('--devices', type=int, default=os.cpu_count())
parser.add_argument('--repeats', type=int, default=20)
args = parser.parse_args()
from flexround_jax import cpu  # noqa: E402
cpu.use_all_cores(args.devices)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import flexround_jax as fr  # noqa: E402
from flexround_jax import provenance  # noqa: E402
from flexround_jax.models import llama  # noqa: E402


class BasicBlock(nn.Module):
  features: int = 64

  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.Conv(self.features, (3, 3), use_bias=False)(x))
    y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
    return nn.relu(x + y)


class TransformerLayer(nn.Module):
  width: int = 512
  heads: int = 8

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    h = nn.LayerNorm()(x)
    qkv = [nn.Dense(d, name=n)(h).reshape(b, t, self.heads, d // self.heads) for n in ('query', 'key', 'value')]
    att = jax.nn.dot_product_attention(*qkv, is_causal=True).reshape(b, t, d)
    x = x + nn.Dense(d, name='out')(att)
    return x + nn.Dense(d, name='fc2')(nn.gelu(nn.Dense(4 * d, name='fc1')(nn.LayerNorm()(x))))


class Wrap(nn.Module):
  block: nn.Module

  @nn.compact
  def __call__(self, x):
    return self.block(x)   # a module attribute becomes the child named 'block'


def median_time(fn, repeats):
  fn()  # compile / warm
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def matmul_peak(repeats):
  a = jax.random.normal(jax.random.key(0), (2048, 2048))
  f = jax.jit(lambda x: x @ x)
  t = median_time(lambda: f(a), repeats)
  return 2 * 2048 ** 3 / t / 1e9


class UnfoldedAttention(llama.Attention):
  """The attention layout before issue 18 (``llama.unfolded_attend``), the in-process baseline of the folded layout
  in ``llama.Attention.attend``."""
  attend = llama.unfolded_attend


class UnfoldedDecoderLayer(llama.DecoderLayer):
  @nn.compact
  def __call__(self, x):
    c = self.config
    x = x + UnfoldedAttention(c, name='attn')(nn.RMSNorm(epsilon=c.norm_eps, name='input_layernorm')(x))
    return x + llama.MLP(c, name='mlp')(nn.RMSNorm(epsilon=c.norm_eps, name='post_attention_layernorm')(x))


STEPS_PER_DISPATCH = fr.engine.unit.steps_per_dispatch(250)   # what a 250-step transformer unit uses


def bench_block(name, block, x, n_devices, repeats, spec, k_steps=None):
  """Per-step time of the engine's jitted K-step training function (K = ``k_steps`` steps per dispatch, default:
  what the engine uses for this block in a 250-step run; the minibatches already on the devices) and the forward
  of the float block over the batch."""
  model = Wrap(block)
  params = model.init(jax.random.key(1), x[:1])['params']
  apply_fn = lambda p, b: model.apply({'params': p}, b)
  cfg = fr.QuantConfig(method='flexround', weight=spec, blocks='block', iters=1000,
                       batch_size=x.shape[0], num_devices=n_devices, progress=False)
  unit = fr.engine.plan_units(apply_fn, params, np.asarray(x), cfg)[0]
  k_steps = k_steps or fr.engine.unit.steps_per_dispatch(250, unit)
  fp_unit = params['block']
  views = fr.engine.kernel_views(unit, fp_unit)
  split = [m.split(m.start(v, s)) for m, v, s in zip(unit.methods, views, unit.specs)]
  trainable, frozen = [t for t, _ in split], [f for _, f in split]
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:n_devices]), ('data',))
  repl, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, 'data'))
  steps, opt = fr.engine.make_train_step(unit, cfg.iters, drop_prob=0.0)
  trainable, frozen, fp_unit = jax.device_put((trainable, frozen, fp_unit), repl)
  opt_state = jax.device_put(opt.init(trainable), repl)
  y = apply_fn(params, x)
  xs = [jax.device_put(jnp.stack([x] * k_steps), shard)]
  ys = [jax.device_put(jnp.stack([y] * k_steps), shard)]
  extra = (jax.device_put(np.zeros((k_steps,), np.float32), repl), jax.random.key(0), jnp.int32(0))
  state = {'t': trainable, 'o': opt_state}

  def call():
    t, o, losses = steps(state['t'], state['o'], frozen, fp_unit, xs, ys, *extra)
    state['t'], state['o'] = t, o
    return losses

  one = fr.engine.make_train_step(unit, cfg.iters, drop_prob=0.0)[0]   # for XLA's flop count of one step
  lowered = one.lower(trainable, opt_state, frozen, fp_unit, [xs[0][:1]], [ys[0][:1]], extra[0][:1], *extra[1:])
  cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get('flops', 0.0)) * (n_devices if n_devices > 1 else 1)
  t = median_time(call, max(3, repeats // k_steps)) / k_steps
  forward = jax.jit(apply_fn)
  t_fwd = median_time(lambda: forward(params, x), repeats)
  granularity = spec.granularity + (str(spec.group_size) if spec.group_size else '')
  return {'block': name, 'granularity': granularity, 'devices': n_devices, 'batch': int(x.shape[0]),
          'steps_per_dispatch': k_steps, 'step_ms': round(t * 1e3, 2), 'forward_ms': round(t_fwd * 1e3, 2),
          'gflop_per_step': round(flops / 1e9, 3), 'gflops': round(flops / t / 1e9, 1)}


def main():
  repeats = args.repeats
  peak = matmul_peak(repeats)
  smollm2 = llama.DecoderLayer(llama.LlamaConfig(vocab_size=49152, dim=576, n_layers=1, n_heads=9, n_kv_heads=3,
                                                 head_dim=64, ffn_dim=1536, rope_base=100000.0))
  smollm2_x = jax.random.normal(jax.random.key(4), (2, 512, 576))
  per_channel, per_group = fr.QuantSpec(4), fr.QuantSpec(4, granularity='per_group', group_size=128)
  cases = [('resnet_basic_block_64x32x32_b32', BasicBlock(), jax.random.normal(jax.random.key(2), (32, 32, 32, 64)),
            per_channel),
           ('transformer_512_seq128_b8', TransformerLayer(), jax.random.normal(jax.random.key(3), (8, 128, 512)),
            per_channel),
           ('smollm2_layer_576_seq512_b2', smollm2, smollm2_x, per_channel),
           ('smollm2_layer_576_seq512_b2', smollm2, smollm2_x, per_group)]
  rows = []

  def add(row):
    row['fraction_of_matmul_peak'] = round(row['gflops'] / peak, 3)
    rows.append(row)
    print(json.dumps(row), flush=True)

  for name, block, x, spec in cases:
    for n in sorted({1, args.devices}):
      add(bench_block(name, block, x, n, repeats, spec))
  # The SmolLM2 layer, 1 device: one step per dispatch (before issue 18), the unfolded attention layout (before
  # issue 18), and larger batches.
  smollm2_unfolded = UnfoldedDecoderLayer(smollm2.config)
  add({**bench_block('smollm2_layer_576_seq512_b2', smollm2, smollm2_x, 1, repeats, per_channel, k_steps=1),
       'baseline': 'one step per dispatch'})
  add({**bench_block('smollm2_layer_576_seq512_b2', smollm2_unfolded, smollm2_x, 1, repeats, per_channel),
       'baseline': 'unfolded attention'})
  for batch in (4, 8):
    x = jax.random.normal(jax.random.key(5), (batch, 512, 576))
    add(bench_block(f'smollm2_layer_576_seq512_b{batch}', smollm2, x, 1, repeats, per_channel))

  def step_ms(name, granularity, devices, baseline=None):
    return next(r['step_ms'] for r in rows
                if (r['block'], r['granularity'], r['devices']) == (name, granularity, devices)
                and r.get('baseline') == baseline)

  for name, granularity in dict.fromkeys((r['block'], r['granularity']) for r in rows):
    if any((r['block'], r['granularity'], r['devices']) == (name, granularity, args.devices) for r in rows) and \
        any((r['block'], r['granularity'], r['devices']) == (name, granularity, 1) for r in rows):
      ratio = step_ms(name, granularity, 1) / step_ms(name, granularity, args.devices)
      print(f'{name} {granularity}: {args.devices} devices vs 1: {ratio:.2f}x faster')
  for n in sorted({1, args.devices}):
    ratio = step_ms('smollm2_layer_576_seq512_b2', 'per_group128', n) / step_ms('smollm2_layer_576_seq512_b2',
                                                                               'per_channel', n)
    print(f'smollm2 layer, {n} device(s): per-group 128 step / per-channel step = {ratio:.2f}')
  base = step_ms('smollm2_layer_576_seq512_b2', 'per_channel', 1)
  print(f'smollm2 layer, 1 device: 1 step per dispatch / {STEPS_PER_DISPATCH} = '
        f'{step_ms("smollm2_layer_576_seq512_b2", "per_channel", 1, "one step per dispatch") / base:.2f}; '
        f'unfolded attention / folded = '
        f'{step_ms("smollm2_layer_576_seq512_b2", "per_channel", 1, "unfolded attention") / base:.2f}')
  out = {'machine': {**provenance.host_info(), 'jax': jax.__version__},
         'matmul_2048_f32_gflops': round(peak, 1), 'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), 'rows': rows}
  os.makedirs(os.path.join(os.path.dirname(__file__), 'results'), exist_ok=True)
  path = os.path.join(os.path.dirname(__file__), 'results', f'engine_{jax.default_backend()}.json')
  with open(path, 'w') as f:
    json.dump(out, f, indent=2)
  print(f'matmul peak {peak:.1f} GFLOP/s; wrote {path}')


if __name__ == '__main__':
  sys.exit(main())
