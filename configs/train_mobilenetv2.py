"""FP training of the Fashion-MNIST MobileNetV2 (experiments/train_image.py)."""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.model = 'mobilenetv2'
  config.model_args = ml_collections.ConfigDict({
      'block_specs': ((1, 16, 1, 1), (4, 24, 2, 1), (4, 32, 2, 2), (4, 64, 2, 1)),
      'stem_width': 16, 'stem_strides': 2, 'head_width': 256})
  config.seed = 0
  config.epochs = 20
  config.batch_size = 128
  config.lr = 0.05
  config.warmup_epochs = 1
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.crop_padding = 2
  config.flip = True
  config.eval_batch_size = 1000
  config.max_steps_per_epoch = -1   # >0: truncate epochs (timing runs)
  return config
