"""Gemma 3 270M weight-only PTQ: the SmolLM2 protocol (configs/smollm2.py) on a second architecture.

The linear layers of the 18 decoder layers; the tied 262k-row embedding and the norms stay as the source has them.
Calibration 128 x 512 tokens of the calibration articles (llama.cpp chunks, bos first), 250 steps of batch 2 per
layer, min/max grid init; evaluation on the 345 llama.cpp chunks, second half of each scored (tasks/gemma3.py).
"""

import os

from flexround_jax import run


def get_config():
  config = run.load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'smollm2.py'))
  config.task = 'gemma3'
  config.task_args.eval_batch = 1   # one 512-token window per call: the chunked head's working set stays small
  return config
