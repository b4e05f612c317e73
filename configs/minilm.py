"""MiniLM-L6 weight-only PTQ: W4 per-channel FlexRound on the six encoder layers (the default demo job).

Budget (documented choice for 2 CPU cores): 512 calibration sentences padded to 64 tokens, 500 steps of batch 16
per layer. Override e.g. --config.quant.method=adaround --config.quant.bits=3 --config.quant.iters=2000.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.task = 'minilm'
  config.task_args = ml_collections.ConfigDict({'n_calib': 512, 'calib_len': 64, 'n_eval': 1000})
  config.eval_fp = True
  config.quant = ml_collections.ConfigDict({
      'method': 'flexround', 'bits': 4, 'granularity': 'per_channel', 'group_size': config_dict.placeholder(int),
      'symmetric': False, 'grid_init': 'mse', 'blocks': r'encoder/layer_\d+', 'iters': 500, 'batch_size': 16,
      'lr': config_dict.placeholder(float), 'lr_s1': config_dict.placeholder(float), 'drop_prob': 0.0,
      'layer_bits': {}, 'exclude': config_dict.placeholder(str), 'seed': 0, 'eval_batch_size': 64,
      'num_devices': config_dict.placeholder(int),   # None: all devices
  })
  return config
