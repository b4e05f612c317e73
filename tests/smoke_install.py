"""Install smoke test: the built wheel, with core dependencies only, quantizes and exports a linen and an nnx model.

``make smoke`` (part of ``make test``) installs the wheel into a fresh venv and runs this file from outside the
repository, so ``flexround_jax`` is the installed copy. Checks: the import comes from that venv, no optional
dependency is installed, FlexRound on two blocks of each toy model, and both exports (safetensors, Orbax) reload to
kernels equal to ``result.params`` and to QTensors that rebuild ``result.params`` exactly.
"""

import importlib.util
import os
import sys
import tempfile
import time

# Extras (pyproject.toml) that must not come with the core install. scipy is not listed: jax itself requires it.
OPTIONAL = ('tensorflow_datasets', 'gensim', 'gguf', 'matplotlib', 'tokenizers', 'qwix', 'torch')


def _leaf(tree, name):
  """The array at '/'-joined ``name`` of a nested dict or nnx State (a Variable's value, or the array itself)."""
  import jax  # pylint: disable=g-import-not-at-top
  for part in name.split('/'):
    tree = tree[part]
  (leaf,) = jax.tree.leaves(tree)
  return leaf


def check(name, params, apply_fn, calib, workdir):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import flexround_jax as fr  # pylint: disable=g-import-not-at-top
  from flexround_jax import export  # pylint: disable=g-import-not-at-top

  config = fr.QuantConfig(method='flexround', weight=fr.QuantSpec(bits=4, granularity='per_channel'),
                          blocks=r'block_\d+', iters=5, batch_size=16, progress=False)
  result = fr.quantize(params, apply_fn, calib, config)
  assert sum(r['kind'] == 'block' for r in result.report) == 2, result.report
  assert result.qtensors, 'no kernel was quantized'
  st_path = os.path.join(workdir, f'{name}.safetensors')
  export.save_safetensors(st_path, result.params, result.qtensors)
  export.save_orbax(os.path.join(workdir, f'{name}_orbax'), result)
  for fmt, (loaded, qtensors) in (('safetensors', export.load_safetensors(st_path)),
                                  ('orbax', export.load_orbax(os.path.join(workdir, f'{name}_orbax')))):
    assert set(qtensors) == set(result.qtensors), (fmt, sorted(qtensors), sorted(result.qtensors))
    for kernel in result.qtensors:
      np.testing.assert_array_equal(np.asarray(_leaf(loaded, kernel)), np.asarray(_leaf(result.params, kernel)),
                                    err_msg=f'{name} {fmt} {kernel}')
    jax.tree.map(np.testing.assert_array_equal, fr.dequantize_params(params, qtensors), result.params)
  print(f'{name}: {len(result.qtensors)} kernels quantized, safetensors and Orbax exports reload equal')


def main():
  import flexround_jax  # pylint: disable=g-import-not-at-top
  where = os.path.abspath(flexround_jax.__file__)
  assert where.startswith(os.path.abspath(sys.prefix) + os.sep), f'flexround_jax imported from {where}, not the venv'
  present = [m for m in OPTIONAL if importlib.util.find_spec(m) is not None]
  assert not present, f'the core install holds optional packages: {present}'
  t0 = time.time()
  import tiny_models  # pylint: disable=g-import-not-at-top  (tests/, next to this file)
  with tempfile.TemporaryDirectory() as workdir:
    check('linen_mlp', *tiny_models.mlp(), workdir)
    check('nnx_mlp', *tiny_models.nnx_mlp(), workdir)
  print(f'smoke test passed: flexround_jax {flexround_jax.__version__} from {where} ({time.time() - t0:.1f} s)')


if __name__ == '__main__':
  main()
