"""Fashion-MNIST image track, the paper's BRECQ setting scaled to 2 CPU cores.

Weight-only; first conv ('stem') and last dense ('head') at 8 bits; blocks = residual / inverted-residual blocks,
stem and head layer-wise; 1024 calibration images; batch 32. CPU budget: 2000 iterations per block (the paper:
20000). AdaRound: lambda 0.01 (0.1 for MobileNetV2), beta 20 -> 2 after a 20 % warm-up, Adam 1e-3.
FlexRound: Adam + cosine; the learning rate is chosen once per model on the validation split
(`python experiments/image_ptq.py --mode lr`, written to experiments/results/image_lr.json).
  --config.task_args.model=mobilenetv2 --config.quant.weight.granularity=per_channel --config.quant.weight.bits=3
"""

import ml_collections

from flexround_jax.config_base import base_config


def get_config():
  config = base_config()
  config.task = 'image'
  config.task_args = ml_collections.ConfigDict({'model': 'resnet', 'data': 'fashion_mnist_local',
                                                'eval_split': 'test'})
  q = config.quant
  q.method = {'name': 'flexround'}   # lr: experiments/results/image_lr.json (set by experiments/image_ptq.py)
  q.weight.update({'bits': 4, 'granularity': 'per_tensor', 'grid_init': 'mse'})
  q.rules = [{'pattern': 'stem', 'bits': 8}, {'pattern': 'head', 'bits': 8}]
  q.iters, q.batch_size, q.eval_batch_size = 2000, 32, 128
  return config
