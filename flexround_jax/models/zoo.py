"""Image models by name, and loading of the FP checkpoints committed under ``experiments/checkpoints/<name>/``.

A checkpoint folder holds ``variables/`` (Orbax: {'params', 'batch_stats'}) and ``model.json``
({'model': name, 'model_args': {...}}), both written by ``experiments/train_image.py``.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from flexround_jax.models.mobilenetv2 import MobileNetV2
from flexround_jax.models.resnet import ResNet

IMAGE_MODELS = {'resnet': ResNet, 'mobilenetv2': MobileNetV2}
CHECKPOINT_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', 'experiments', 'checkpoints'))


def _tuples(v):
  return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def make_image_model(name: str, use_bn: bool = True, **model_args) -> nn.Module:
  """The Flax module ``name`` ('resnet' | 'mobilenetv2') with ``model_args`` (lists become tuples)."""
  if name not in IMAGE_MODELS:
    raise ValueError(f'unknown image model {name!r}; choose one of {sorted(IMAGE_MODELS)}')
  return IMAGE_MODELS[name](use_bn=use_bn, **{k: _tuples(v) for k, v in model_args.items()})


def save_image_model(directory: str, name: str, model_args: dict, variables: dict) -> None:
  """Writes ``variables`` ({'params', 'batch_stats'}) and ``model.json`` into ``directory`` (made absolute)."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, 'variables'), jax.device_get(variables), force=True)
  with open(os.path.join(directory, 'model.json'), 'w') as f:
    json.dump({'model': name, 'model_args': model_args}, f, indent=1)


def load_image_model(name: str, checkpoint_dir: str | None = None) -> tuple[nn.Module, dict]:
  """(module with BatchNorm, variables {'params', 'batch_stats'}) from ``experiments/checkpoints/<name>``.

  Apply in eval mode: ``module.apply(variables, images)``; images (N, 28, 28, 1) uint8 or float in [0, 1].
  ``fold_bn.fold_batch_norm`` turns this into the BN-free deployed form that gets quantized.
  """
  directory = os.path.abspath(checkpoint_dir or os.path.join(CHECKPOINT_ROOT, name))
  meta_path = os.path.join(directory, 'model.json')
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f'no checkpoint for {name!r} at {directory}; train it with '
                            f'`python experiments/train_image.py --config=configs/train_{name}.py`')
  with open(meta_path) as f:
    meta = json.load(f)
  module = make_image_model(meta['model'], **meta['model_args'])
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1), jnp.float32)))
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(os.path.join(directory, 'variables'), dict(abstract))
  return module, variables
