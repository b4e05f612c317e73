"""Fashion-MNIST image track, the paper's BRECQ setting scaled to 2 CPU cores.

Weight-only; first conv ('stem') and last dense ('head') at 8 bits; blocks = residual / inverted-residual blocks,
stem and head layer-wise; 1024 calibration images; batch 32. CPU budget: 2000 iterations per block (the paper:
20000). AdaRound: lambda 0.01 (0.1 for MobileNetV2), beta 20 -> 2 after a 20 % warm-up, Adam 1e-3.
FlexRound: Adam + cosine; the learning rate is chosen once per model on the validation split
(`python experiments/image_ptq.py --mode lr`, written to experiments/results/image_lr.json).
  --config.task_args.model=mobilenetv2 --config.quant.granularity=per_channel --config.quant.bits=3
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.task = 'image'
  config.task_args = ml_collections.ConfigDict({'model': 'resnet', 'data': 'fashion_mnist_local',
                                                'eval_split': 'test'})
  config.eval_fp = True
  config.quant = ml_collections.ConfigDict({
      'method': 'flexround', 'bits': 4, 'granularity': 'per_tensor', 'group_size': config_dict.placeholder(int),
      'symmetric': False, 'grid_init': 'mse', 'blocks': config_dict.placeholder(str), 'iters': 2000,
      'batch_size': 32, 'lr': config_dict.placeholder(float), 'lr_s1': config_dict.placeholder(float),
      'drop_prob': 0.0, 'layer_bits': {'stem': 8, 'head': 8}, 'exclude': config_dict.placeholder(str), 'seed': 0,
      'adaround_lambda': 0.01, 'eval_batch_size': 128,
      'num_devices': config_dict.placeholder(int),   # None: all devices
  })
  return config
