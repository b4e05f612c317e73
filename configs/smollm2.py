"""SmolLM2-135M weight-only PTQ, the official FlexRound LLM setting scaled to a CPU budget.

Official (Llama-2-7B): per-channel asymmetric, min/max init, 512 x 1024 tokens of C4, 5000 iterations of batch 2
per decoder layer, Adam lr 3e-3 (W4) / 2.5e-3 (W3) with cosine decay, quantized inputs. Here: 128 x 512 tokens
of the calibration articles and a CPU budget of iterations (override --config.quant.iters).
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.task = 'smollm2'
  config.task_args = ml_collections.ConfigDict({'n_calib': 128, 'calib_len': 512,
                                                'max_windows': config_dict.placeholder(int), 'eval_batch': 4})
  config.eval_fp = False          # experiments/results/llm_fp.json holds the float perplexity
  config.quant = ml_collections.ConfigDict({
      'method': 'flexround', 'bits': 4, 'granularity': 'per_channel', 'group_size': config_dict.placeholder(int),
      'symmetric': False, 'grid_init': 'minmax', 'blocks': r'layers_\d+', 'iters': 250, 'batch_size': 2,
      'lr': 3e-3, 'lr_s1': config_dict.placeholder(float), 'drop_prob': 0.0, 'layer_bits': {},
      'exclude': config_dict.placeholder(str), 'seed': 0, 'eval_batch_size': 8,
      'num_devices': config_dict.placeholder(int),   # None: all devices
  })
  return config
