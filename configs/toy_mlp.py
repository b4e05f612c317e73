"""Smoke run: a small Flax MLP built on the spot, W4 per-channel FlexRound (seconds on a CPU)."""

import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.task = 'toy_mlp'
  config.task_args = ml_collections.ConfigDict({'width': 64, 'depth': 3, 'n_calib': 512, 'n_eval': 512, 'seed': 0})
  config.eval_fp = True
  config.quant = ml_collections.ConfigDict({
      'method': 'flexround', 'bits': 4, 'granularity': 'per_channel', 'group_size': config_dict.placeholder(int),
      'symmetric': False, 'grid_init': 'mse', 'blocks': config_dict.placeholder(str), 'iters': 500,
      'batch_size': 32, 'lr': config_dict.placeholder(float), 'lr_s1': config_dict.placeholder(float),
      'drop_prob': 0.0, 'layer_bits': {}, 'exclude': config_dict.placeholder(str), 'seed': 0,
      'num_devices': config_dict.placeholder(int),   # None: all devices
  })
  return config
