"""Fashion-MNIST classifiers trained here (ResNet, MobileNetV2) as quantization tasks, BRECQ setting.

The float checkpoint (``experiments/checkpoints/<model>``) is loaded, its BatchNorms folded into the preceding
convs (the deployed form), and the BN-free model is quantized. Calibration: the fixed 1024 calibration images
of the training split (``data.fashion_mnist.split_indices``). Evaluation: top-1 accuracy on ``eval_split``
('test' for reported numbers, 'validation' — held out from the training split — for choosing learning rates).
Blocks: the residual / inverted-residual blocks; the stem conv and the head are reconstructed layer-wise.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from flexround_jax.data import fashion_mnist
from flexround_jax.models import fold_bn, zoo
from flexround_jax.tasks import Task

BLOCKS = {'resnet': r'BasicBlock_\d+', 'mobilenetv2': r'InvertedResidual_\d+'}


def _splits(data_name: str, data_dir: str | None):
  try:
    return fashion_mnist.load_splits(data_dir=data_dir, name=data_name)
  except Exception:  # not prepared yet: build it from the Debian package's IDX files (no network), then retry
    if data_name != fashion_mnist.NAME:
      raise
    print(f'TFDS data set {data_name!r} not prepared yet: preparing it from the local IDX files (make data)')
    fashion_mnist.prepare(data_dir=data_dir)
    return fashion_mnist.load_splits(data_dir=data_dir, name=data_name)


def make(args) -> Task:
  name = args.get('model', 'resnet')
  data_name = args.get('data', fashion_mnist.NAME)
  eval_split = args.get('eval_split', 'test')
  module, variables = zoo.load_image_model(name, args.get('checkpoint_dir', None))
  with open(os.path.join(args.get('checkpoint_dir', None) or os.path.join(zoo.CHECKPOINT_ROOT, name),
                         'model.json')) as f:
    model_args = json.load(f)['model_args']
  deployed = zoo.make_image_model(name, use_bn=False, **model_args)
  params = fold_bn.fold_batch_norm(variables['params'], variables['batch_stats'])
  splits = _splits(data_name, args.get('data_dir', None))
  calib = splits['calibration'][0]
  images, labels = splits[eval_split]

  def apply_fn(p, x):
    return deployed.apply({'params': p}, x)

  predict_fp = jax.jit(apply_fn)

  def evaluate(p, forward=None) -> dict:
    predict = predict_fp if forward is None else jax.jit(forward)   # traced anew: its quantizers take effect
    correct = 0
    for start in range(0, len(images), 1000):
      logits = predict(p, images[start:start + 1000])
      correct += int(np.sum(np.asarray(logits).argmax(-1) == labels[start:start + 1000]))
    return {'top1': 100.0 * correct / len(images), 'eval_split': eval_split, 'n_eval': int(len(images))}

  return Task(f'fashion_mnist_{name}', params, apply_fn, calib, evaluate, blocks=BLOCKS[name],
              notes=f'{name} trained here on Fashion-MNIST, BN folded; calibration = 1024 training images; '
                    f'top1 on the {eval_split} split')
