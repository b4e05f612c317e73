"""Why the engine runs convolutional blocks one step per dispatch on CPU: XLA's CPU backend runs a convolution inside
a loop (``lax.scan``) or a conditional (``lax.cond``) several times slower than at the top level of a program.

Times the gradient of a ResNet basic block (64 channels, 32x32, batch 32) on one CPU device: plain, inside a
2-step ``lax.scan`` (per step), inside ``lax.cond``, and inside a 2-step unrolled scan (no loop left). Writes
benchmarks/results/conv_loop_cpu.json.

  python benchmarks/bench_conv_loop.py
"""

import json
import os
import time

from flexround_jax import cpu
cpu.use_all_cores(1)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flexround_jax import provenance  # noqa: E402


class BasicBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.Conv(64, (3, 3), use_bias=False)(x))
    return nn.relu(x + nn.Conv(64, (3, 3), use_bias=False)(y))


def median_ms(fn, repeats=3):
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return round(float(np.median(times)) * 1e3, 1)


def main():
  model = BasicBlock()
  x = jax.random.normal(jax.random.key(0), (32, 32, 32, 64))
  params = model.init(jax.random.key(1), x[:1])
  grad = jax.grad(lambda p, x: jnp.mean(model.apply(p, x) ** 2))
  xs = jnp.stack([x, x])

  def scanned(p, xs, unroll):
    return jax.lax.scan(lambda c, x: (c, grad(p, x)), 0, xs, unroll=unroll)[1]

  plain = jax.jit(grad)
  scan = jax.jit(lambda p, xs: scanned(p, xs, 1))
  unrolled = jax.jit(lambda p, xs: scanned(p, xs, True))
  cond = jax.jit(lambda p, x, f: jax.lax.cond(f, lambda: grad(p, x), lambda: jax.tree.map(jnp.zeros_like, p)))
  out = {'machine': {**provenance.host_info(), 'jax': jax.__version__},
         'plain_ms': median_ms(lambda: plain(params, x)),
         'scan_ms_per_step': median_ms(lambda: scan(params, xs)) / 2,
         'cond_ms': median_ms(lambda: cond(params, x, True)),
         'unrolled_scan_ms_per_step': median_ms(lambda: unrolled(params, xs)) / 2}
  print(json.dumps(out))
  path = os.path.join(os.path.dirname(__file__), 'results', 'conv_loop_cpu.json')
  with open(path, 'w') as f:
    json.dump(out, f, indent=2)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
