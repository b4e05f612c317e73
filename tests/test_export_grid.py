"""The grid rules the exporters share (flexround_jax.export.grid), and the export package's public surface."""

import pkgutil
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import flexround_jax as fr
from flexround_jax.export import grid


def test_groups_divide():
  assert grid.groups_divide(fr.QuantSpec(bits=4, granularity='per_group', group_size=32), 64)
  assert not grid.groups_divide(fr.QuantSpec(bits=4, granularity='per_group', group_size=32), 48)
  assert grid.groups_divide(fr.QuantSpec(bits=4, granularity='per_channel'), 48)
  assert grid.groups_divide(fr.QuantSpec(bits=4, granularity='per_tensor'), 7)


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16', np.float16, jnp.bfloat16, np.dtype('float32')])
def test_scales_exact_is_a_round_trip_through_the_dtype(dtype):
  scale = np.array([[0.5, 2.0 ** -3, 0.1, 1e6, 1e39 / 1e10]], np.float32)   # 1e29: beyond float16, inside bfloat16
  with np.errstate(over='ignore'):
    want = scale.astype(jnp.dtype(dtype)).astype(np.float32) == scale
  with warnings.catch_warnings():
    warnings.simplefilter('error')   # a step beyond the dtype's range is not exact, and no overflow warning
    got = grid.scales_exact(scale, dtype)
  assert got.shape == scale.shape and got.dtype == bool
  np.testing.assert_array_equal(got, want)
  assert got[0, 0] and got[0, 1]
  assert bool(got[0, 2]) == (jnp.dtype(dtype) == np.float32)


def test_export_offers_every_exporter_and_the_root_has_no_old_modules():
  for name in fr.export.__all__:
    assert getattr(fr.export, name) is not None, name
  assert {'save_gguf', 'save_compressed_tensors', 'qwix_rules', 'to_qwix_params', 'ptq_model'} <= set(dir(fr.export))
  root = {m.name for m in pkgutil.iter_modules(fr.__path__)}   # the modules beside flexround_jax/__init__.py
  assert 'export' in root and not [m for m in root if m.startswith('export_')], root   # no modules left at the root
