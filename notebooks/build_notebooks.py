"""Writes the notebooks in this folder from the cell sources below (committed without outputs).

  python notebooks/build_notebooks.py
Each notebook reads FLEXROUND_NOTEBOOK_TINY=1 (set by the tests) to shrink data and iterations.
"""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

INSTALL = '''# Install: in this repository's checkout (or a Colab runtime where you cloned it) this installs the package
# and its pinned dependencies; on a machine where flexround_jax is already installed it does nothing.
import importlib.util, os, subprocess, sys
if importlib.util.find_spec('flexround_jax') is None:
    root = os.path.abspath('..') if os.path.exists('../pyproject.toml') else os.path.abspath('flexround_jax')
    subprocess.check_call([sys.executable, '-m', 'pip', 'install', '-q', '-e', root])
TINY = os.environ.get('FLEXROUND_NOTEBOOK_TINY') == '1'   # CI runs every notebook with a tiny budget
'''

QUICKSTART = [
    new_markdown_cell('''# flexround_jax quick start

Quantize a Flax model's weights to 4 bits with **FlexRound** (learned rounding by element-wise division) and
compare it with round-to-nearest (RTN), in a few lines. Runs on a CPU in a few minutes. On a TPU/GPU runtime
nothing changes in the code: the engine shards the calibration batch over all devices it finds
(`jax.devices()`); raise `iters` towards the paper's 5k-20k there.

If you opened this in Colab: `!git clone <this repository> flexround_jax` first, then run the install cell.'''),
    new_code_cell(INSTALL),
    new_markdown_cell('## A small Flax model with residual blocks, trained for a few seconds'),
    new_code_cell('''import flexround_jax as fr      # before jax: one XLA device per CPU core
import jax, jax.numpy as jnp, numpy as np, optax
import flax.linen as nn

class Block(nn.Module):
    width: int
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(self.width)(nn.gelu(nn.Dense(2 * self.width)(nn.LayerNorm()(x))))

class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(64)(x)
        for i in range(3):
            x = Block(64, name=f'block_{i}')(x)
        return nn.Dense(10)(x)

# A synthetic 10-class problem with correlated (low-rank) inputs, like real activations.
key = jax.random.key(0)
mix = jax.random.normal(key, (8, 32))
x = jax.random.normal(jax.random.key(1), (4096, 8)) @ mix + 0.1 * jax.random.normal(jax.random.key(2), (4096, 32))
y = jnp.argmax(x @ jax.random.normal(jax.random.key(3), (32, 10)), axis=-1)
model = Net()
params = model.init(jax.random.key(4), x[:1])['params']
opt = optax.adam(1e-3); state = opt.init(params)

@jax.jit
def train_step(p, s, xb, yb):
    loss, g = jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({'params': p}, xb), yb).mean())(p)
    u, s = opt.update(g, s)
    return optax.apply_updates(p, u), s, loss

for i in range(100 if TINY else 600):
    idx = np.random.default_rng(i).choice(3072, 128)
    params, state, loss = train_step(params, state, x[idx], y[idx])
apply_fn = lambda p, b: model.apply({'params': p}, b)
accuracy = lambda p: float((apply_fn(p, x[3072:]).argmax(-1) == y[3072:]).mean())
print(f'float accuracy {accuracy(params):.3f}')'''),
    new_markdown_cell('## Quantize: RTN vs FlexRound (W4 per-channel), block by block'),
    new_code_cell('''calib = x[:512]                              # calibration samples (no labels needed)
results = {}
for method in ['rtn', 'flexround']:
    config = fr.QuantConfig(method=method, weight=fr.QuantSpec(bits=4, granularity='per_channel'),
                            blocks=r'block_\\d+', iters=50 if TINY else 1000, batch_size=32, keep_states=True)
    results[method] = fr.quantize(params, apply_fn, calib, config)
    print(f'{method:10s} accuracy {accuracy(results[method].params):.3f}')'''),
    new_code_cell('''from flexround_jax import plots
plots.block_losses(results['flexround']);'''),
    new_markdown_cell('''## What FlexRound learned
S2 (one divisor per weight), s3 (per output channel) start at 1. Weights whose code moved beyond the two
nearest grid points are the ones the reciprocal rule lets move further.'''),
    new_code_cell('''plots.flexround_scales(results['flexround'].states)
moves = plots.rounding_moves(params, results['flexround'].qtensors, results['rtn'].qtensors)
plots.plot_rounding_moves(moves);'''),
    new_markdown_cell('## Save with Orbax and reload: the integer codes rebuild the same model'),
    new_code_cell('''import tempfile
from flexround_jax import export
path = tempfile.mkdtemp() + '/quantized'
export.save_orbax(path, results['flexround'])
_, qtensors = export.load_orbax(path)
rebuilt = fr.dequantize_params(params, qtensors)
assert (apply_fn(rebuilt, x[3072:]) == apply_fn(results['flexround'].params, x[3072:])).all()
qt = qtensors['block_0/Dense_0/kernel']
print(qt.codes.dtype, qt.codes.shape, 'packed bytes:', qt.pack().data.nbytes, 'float bytes:', qt.codes.size * 4)'''),
]


def write(name, cells):
  nb = new_notebook(cells=cells, metadata={
      'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
      'language_info': {'name': 'python'}, 'colab': {'provenance': []}})
  nbformat.write(nb, os.path.join(HERE, name))


if __name__ == '__main__':
  write('quickstart.ipynb', QUICKSTART)
