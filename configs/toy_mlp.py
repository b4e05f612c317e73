"""Smoke run: a small Flax MLP built on the spot, W4 per-channel FlexRound (seconds on a CPU)."""

import ml_collections

from flexround_jax.config_base import base_config


def get_config():
  config = base_config()
  config.task = 'toy_mlp'
  config.task_args = ml_collections.ConfigDict({'width': 64, 'depth': 3, 'n_calib': 512, 'n_eval': 512, 'seed': 0})
  q = config.quant
  q.method = {'name': 'flexround'}
  q.weight.update({'bits': 4, 'granularity': 'per_channel', 'grid_init': 'mse'})
  q.iters, q.batch_size = 500, 32
  return config
