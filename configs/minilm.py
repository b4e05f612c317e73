"""MiniLM-L6 weight-only PTQ: W4 per-channel FlexRound on the six encoder layers (the default demo job).

Budget (documented choice for 2 CPU cores): 512 calibration sentences padded to 64 tokens, 500 steps of batch 16
per layer. Override e.g. --config.quant.method.name=adaround --config.quant.weight.bits=3 --config.quant.iters=2000.
"""

import ml_collections

from flexround_jax.config_base import base_config


def get_config():
  config = base_config()
  config.task = 'minilm'
  config.task_args = ml_collections.ConfigDict({'n_calib': 512, 'calib_len': 64, 'n_eval': 1000})
  q = config.quant
  q.method = {'name': 'flexround'}
  q.weight.update({'bits': 4, 'granularity': 'per_channel', 'grid_init': 'mse'})
  q.blocks = r'encoder/layer_\d+'
  q.iters, q.batch_size, q.eval_batch_size = 500, 16, 64
  return config
