"""A small Flax MLP regression task built on the spot (no downloads): a quick smoke run of the whole pipeline."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexround_jax.tasks import Task


class _Block(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(self.width)(nn.gelu(nn.Dense(2 * self.width)(nn.LayerNorm()(x))))


class ToyMLP(nn.Module):
  width: int = 64
  depth: int = 3

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width)(x)
    for i in range(self.depth):
      x = _Block(self.width, name=f'block_{i}')(x)
    return nn.Dense(8)(x)


def make(args) -> Task:
  model = ToyMLP(width=args.get('width', 64), depth=args.get('depth', 3))
  k = jax.random.split(jax.random.key(args.get('seed', 0)), 4)
  n_calib, n_eval, d = args.get('n_calib', 512), args.get('n_eval', 512), 32
  mix = jax.random.normal(k[0], (6, d))
  data = jax.random.normal(k[1], (n_calib + n_eval, 6)) @ mix + 0.05 * jax.random.normal(k[2], (n_calib + n_eval, d))
  params = model.init(k[3], data[:1])['params']
  apply_fn = lambda p, x: model.apply({'params': p}, x)
  calib, held_out = np.asarray(data[:n_calib]), np.asarray(data[n_calib:])
  y_fp = apply_fn(params, held_out)

  def evaluate(p, forward=None):
    y = (forward or apply_fn)(p, held_out)
    return {'output_mse': float(jnp.mean((y - y_fp) ** 2)),
            'output_rel_err': float(jnp.linalg.norm(y - y_fp) / jnp.linalg.norm(y_fp))}

  return Task('toy_mlp', params, apply_fn, calib, evaluate, blocks=r'block_\d+',
              notes='random MLP on low-rank inputs; error is measured against the float model on held-out inputs')
