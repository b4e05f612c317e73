"""SmolLM2-135M W4A8: 4-bit per-channel weights with dynamic per-token asymmetric 8-bit activations at the input of
every quantized kernel (the LRQ / FlexRound repositories' W4A8 evaluation, ``SwapLinear``), perplexity on the same
protocol as the weight-only table.

Two ways to get the W4A8 model, both run here:
  * ``eval``: the official one. FlexRound / LRQ reconstruct with float activations (OFF: "activations: none during
    reconstruction") and the model is evaluated with per-token 8-bit inputs. Each row takes the weights exported by
    ``llm_ptq.py`` (the ``quantized/`` Orbax export of its workdir; RTN is recomputed, it needs no data) and only
    adds the activation quantizers. A 'float' row (W16A8) shows what 8-bit inputs alone cost.
  * ``trained``: our engine with ``QuantConfig(activation=per_token(8))``: every block is reconstructed with its
    kernel inputs already quantized, so the weights learn to compensate for them.
One JSON per row: experiments/results/llm_per_channel_w4a8_<method>[_trained].json. Not reproduced: OFF also
quantizes the k_proj / v_proj outputs (the KV cache) per token at 8 bits; we quantize kernel inputs only.

  python experiments/llm_wa.py --rows float,rtn --sources gptq=work/llm_ptq/llm_per_channel_w4_gptq
  python experiments/llm_wa.py --trained flexround
"""

from flexround_jax import cpu

cpu.use_all_cores()   # one XLA device per core, before jax starts

# pylint: disable=g-import-not-at-top,wrong-import-position

import argparse
import dataclasses
import json
import os
import time

from flexround_jax import compile_cache, export, provenance, run as runner, tasks
from flexround_jax.quantizers import activation as act_lib

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, 'results')
A_BITS = 8


def _config(method: str):
  import llm_ptq  # pylint: disable=import-outside-toplevel
  config = llm_ptq.load_config()
  q = config.quant
  q.method = {'name': method, **llm_ptq.METHOD_KNOBS.get(method, lambda b: {})(4)}
  return config


def _write(name: str, results: dict):
  out = os.path.join(RESULTS, f'llm_per_channel_w4a8_{name}.json')
  with open(out, 'w') as f:
    json.dump(results, f, indent=2, default=float)
  print(json.dumps({'row': name, 'ppl': results['quantized']['ppl']}), flush=True)


def eval_row(task, name: str, params, kernel_names, source: str, weight_only=None):
  """Perplexity of ``params`` with per-token A_BITS-bit inputs at every kernel in ``kernel_names``
  (``weight_only``: the same weights' A16 metrics, when their run recorded them)."""
  modules = sorted({k.rsplit('/', 1)[0] for k in kernel_names})
  acts = {m: (act_lib.per_token(A_BITS), {}) for m in modules}
  t0 = time.time()
  metrics = task.evaluate(params, act_lib.quantized_apply(task.apply_fn, acts))
  _write(name, {'task': task.name, 'setting': 'per_channel_w4a8', 'method': name, 'weights_from': source,
                'activation': act_lib.per_token(A_BITS).describe(), 'quantized_inputs': len(modules),
                'quantized': metrics, 'weight_only': weight_only, 'eval_wall_s': round(time.time() - t0, 2), 'commit': provenance.git_commit(),
                'host': provenance.host_info()})


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--rows', default='float,rtn', help='rows computed here: float (W16A8), rtn')
  parser.add_argument('--sources', default='', help='method=workdir of an llm_ptq.py run (its quantized/ export), '
                                                   'comma-separated, e.g. flexround=work/llm_ptq/llm_per_channel_w4_flexround')
  parser.add_argument('--trained', default='', help='methods to reconstruct with A8 inputs (e.g. flexround)')
  parser.add_argument('--iters', type=int, default=None)
  parser.add_argument('--workdir', default=os.path.join('work', 'llm_wa'))
  args = parser.parse_args()
  compile_cache.enable(os.path.join(args.workdir, 'jax_cache'))
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  sources = dict(s.split('=', 1) for s in args.sources.split(',') if s)
  for method, path in sources.items():   # every source checked before any long work
    if not os.path.isdir(os.path.join(path, 'quantized')):
      raise SystemExit(f'--sources {method}={path}: no quantized/ export there (run llm_ptq.py first)')
  task = tasks.make('smollm2', _config('rtn').task_args)
  from flexround_jax.engine import quantize
  qcfg = runner.quant_config(_config('rtn').quant, None)
  for row in [r for r in args.rows.split(',') if r]:
    if os.path.exists(os.path.join(RESULTS, f'llm_per_channel_w4a8_{row}.json')):
      print(f'skip {row} (exists)')
      continue
    if row == 'float':   # the kernels the W4 rows quantize, from the plan
      plan = quantize(task.params, task.apply_fn, task.calib, dataclasses.replace(qcfg, dry_run=True)).plan
      eval_row(task, 'float', task.params, [k for p in plan for k in p['kernels']], 'float (W16)')
    elif row == 'rtn':
      res = quantize(task.params, task.apply_fn, task.calib, dataclasses.replace(qcfg, progress=False))
      eval_row(task, 'rtn', res.params, res.qtensors, 'RTN computed here')
    else:
      raise SystemExit(f'unknown row {row!r}: float, rtn (other methods via --sources or --trained)')
  for method, path in sources.items():
    if os.path.exists(os.path.join(RESULTS, f'llm_per_channel_w4a8_{method}.json')):
      print(f'skip {method} (exists)')
      continue
    params, qtensors = export.load_orbax(os.path.join(path, 'quantized'))
    ran = os.path.join(path, 'results.json')
    weight_only = json.load(open(ran))['quantized'] if os.path.exists(ran) else None
    eval_row(task, method, params, qtensors, os.path.abspath(path), weight_only)
  for method in [m for m in args.trained.split(',') if m]:
    name = f'{method}_trained'
    if os.path.exists(os.path.join(RESULTS, f'llm_per_channel_w4a8_{name}.json')):
      print(f'skip {name} (exists)')
      continue
    config = _config(method)
    config.quant.activation = {'name': 'per_token', 'bits': A_BITS}
    if args.iters is not None:
      config.quant.iters = args.iters
    with provenance.PeakRSS() as rss:
      results = runner.run(config, os.path.join(args.workdir, name))
    results.update({'setting': 'per_channel_w4a8', 'peak_rss_mb': round(rss.peak_mb, 1)})
    _write(name, results)


if __name__ == '__main__':
  main()
