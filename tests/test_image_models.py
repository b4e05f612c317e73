"""Image models: shapes, block naming contract for the engine, BatchNorm folding equals eval-mode BN model."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexround_jax.models import _common, fold_bn, mobilenetv2, resnet, zoo

SMALL = {
    'resnet': dict(stage_sizes=(1, 1, 1), widths=(8, 16, 16), stem_width=8),
    'mobilenetv2': dict(block_specs=((1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 1, 1)), stem_width=8, head_width=32),
}
BLOCK_REGEX = {'resnet': resnet.BLOCK_REGEX, 'mobilenetv2': mobilenetv2.BLOCK_REGEX}


def _init(name, use_bn=True):
  model = zoo.make_image_model(name, use_bn=use_bn, **SMALL[name])
  return model, model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)))


@pytest.mark.parametrize('name', ['resnet', 'mobilenetv2'])
def test_shapes_and_block_paths(name):
  model, variables = _init(name)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1)), jnp.uint8)
  assert model.apply(variables, x).shape == (3, 10)
  logits, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert logits.shape == (3, 10)
  blocks = [k for k in variables['params'] if re.fullmatch(BLOCK_REGEX[name], k)]
  assert blocks and len(blocks) == len(set(blocks))
  # Every weight leaf is a Conv/Dense kernel, bias, or BN scale/bias; kernels have Flax layouts.
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables['params'])[0]:
    keys = [p.key for p in path]
    assert keys[-1] in ('kernel', 'bias', 'scale')
    if keys[-1] == 'kernel':
      assert leaf.ndim in (2, 4)
  if name == 'mobilenetv2':  # depthwise: kernel (3, 3, 1, C)
    assert variables['params']['InvertedResidual_1']['depthwise']['kernel'].shape == (3, 3, 1, 32)


@pytest.mark.parametrize('name', ['resnet', 'mobilenetv2'])
def test_bn_free_variant_has_biases_and_same_kernels(name):
  _, bn_vars = _init(name)
  _, free_vars = _init(name, use_bn=False)
  assert 'batch_stats' not in free_vars
  folded = fold_bn.fold_batch_norm(bn_vars['params'], bn_vars['batch_stats'])
  assert jax.tree.map(jnp.shape, folded) == jax.tree.map(jnp.shape, free_vars['params'])


@pytest.mark.parametrize('name', ['resnet', 'mobilenetv2'])
def test_folded_model_equals_eval_mode_bn_model(name):
  model, variables = _init(name)
  k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
  params = dict(variables['params'])
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: jax.random.uniform(jax.random.fold_in(k1, hash(str(p)) % 2**31), v.shape, minval=0.5, maxval=1.5)
      if p[-1].key == 'scale' else (0.2 * jax.random.normal(jax.random.fold_in(k2, hash(str(p)) % 2**31), v.shape)
                                    if p[-1].key == 'bias' else v), params)
  stats = jax.tree_util.tree_map_with_path(
      lambda p, v: (0.3 * jax.random.normal(jax.random.fold_in(k3, hash(str(p)) % 2**31), v.shape)
                    if p[-1].key == 'mean' else
                    jax.random.uniform(jax.random.fold_in(k4, hash(str(p)) % 2**31), v.shape, minval=0.2, maxval=2.0)),
      variables['batch_stats'])
  x = jax.random.uniform(jax.random.key(2), (4, 28, 28, 1))
  y_bn = model.apply({'params': params, 'batch_stats': stats}, x)
  free = zoo.make_image_model(name, use_bn=False, **SMALL[name])
  y_folded = free.apply({'params': fold_bn.fold_batch_norm(params, stats)}, x)
  np.testing.assert_allclose(y_folded, y_bn, rtol=1e-4, atol=1e-4 * float(jnp.abs(y_bn).max()))
  assert float(jnp.std(y_bn)) > 1e-3  # non-trivial outputs


def test_depthwise_shift_conv_matches_grouped_conv():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 6))
  k = jax.random.normal(jax.random.key(1), (3, 3, 1, 6))
  for s in (1, 2):
    ref = jax.lax.conv_general_dilated(x, k, (s, s), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                       feature_group_count=6)
    got = _common.depthwise_conv_general_dilated(x, k, (s, s), 'SAME', feature_group_count=6)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    g_ref = jax.grad(lambda k: jnp.sum(jnp.sin(jax.lax.conv_general_dilated(
        x, k, (s, s), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=6))))(k)
    g = jax.grad(lambda k: jnp.sum(jnp.sin(_common.depthwise_conv_general_dilated(
        x, k, (s, s), 'SAME', feature_group_count=6))))(k)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_save_and_load_image_model(tmp_path):
  model, variables = _init('resnet')
  zoo.save_image_model(str(tmp_path / 'ck'), 'resnet', SMALL['resnet'], variables)
  loaded_model, loaded = zoo.load_image_model('resnet', checkpoint_dir=str(tmp_path / 'ck'))
  assert loaded_model == model
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  with pytest.raises(FileNotFoundError, match='train_image.py'):
    zoo.load_image_model('resnet', checkpoint_dir=str(tmp_path / 'missing'))
