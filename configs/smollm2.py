"""SmolLM2-135M weight-only PTQ, the official FlexRound LLM setting scaled to a CPU budget.

Official (Llama-2-7B): per-channel asymmetric, min/max init, 512 x 1024 tokens of C4, 5000 iterations of batch 2
per decoder layer, Adam lr 3e-3 (W4) / 2.5e-3 (W3) with cosine decay, quantized inputs. Here: 128 x 512 tokens
of the calibration articles and a CPU budget of iterations (override --config.quant.iters).
"""

import ml_collections
from ml_collections import config_dict

from flexround_jax.config_base import base_config


def get_config():
  config = base_config()
  config.task = 'smollm2'
  config.task_args = ml_collections.ConfigDict({'n_calib': 128, 'calib_len': 512,
                                                'max_windows': config_dict.placeholder(int), 'eval_batch': 4,
                                                'vocab_chunk': config_dict.placeholder(int)})
  config.eval_fp = False          # experiments/results/llm_fp.json holds the float perplexity
  q = config.quant
  q.method = {'name': 'flexround', 'lr': 3e-3}
  q.weight.update({'bits': 4, 'granularity': 'per_channel', 'grid_init': 'minmax'})
  q.blocks = r'layers_\d+'
  q.iters, q.batch_size, q.eval_batch_size = 250, 2, 8
  return config
