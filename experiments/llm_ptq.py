"""SmolLM2-135M PTQ: RTN / GPTQ / AdaRound / FlexRound / LRQ / GPTQ->FlexRound at W4 and W3, per-channel
(official) and per-group 128.

Writes experiments/results/llm_<granularity>_w<bits>_<method>.json (perplexity on the fixed protocol, per-layer
report, wall time, peak RSS, export size). Existing JSONs are skipped; an interrupted setting resumes from its
per-layer checkpoint in the workdir. Also exports each quantized model as packed safetensors, reloads it and
checks that it equals the fake-quant model exactly (every parameter bit for bit, and the perplexity of the first
16 windows).

  python experiments/llm_ptq.py [--only per_channel_w4] [--methods rtn,flexround] [--iters N] [--max-windows N]
  python experiments/llm_ptq.py --curve [--iters 50]   # perplexity vs iterations -> experiments/results/llm_iters/
  python experiments/llm_ptq.py --only per_channel_w4 --methods flexround --compute-dtype bfloat16
      # -> llm_precision/llm_per_channel_w4_flexround_bf16.json (QuantConfig.compute_dtype; --fallback-samples N
      # adds _fbN, --cache-dtype bfloat16 _cachebf16)

Every JSON records the peak RSS of each phase of the run (``rss_phases_mb``: load, quantize, evaluation, export,
the export check) and the host (CPU model, cores, its bfloat16 flags).
"""

from flexround_jax import cpu

cpu.use_all_cores()   # one XLA device per core, before jax starts

# pylint: disable=g-import-not-at-top,wrong-import-position

import argparse
import json
import os
import shutil

import jax
import numpy as np

from flexround_jax import compile_cache, export, provenance, run as runner, tasks
from flexround_jax.engine.loop import release_free_host_memory

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = [('per_channel', 4, None), ('per_channel', 3, None), ('per_group', 4, 128), ('per_group', 3, 128)]
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


def load_config():
  return runner.load_config_file(os.path.join(HERE, '..', 'configs', 'smollm2.py'))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--only', default=None, help='one setting, e.g. per_channel_w4 or per_group128_w3')
  parser.add_argument('--methods', default=','.join(METHODS), help='comma-separated subset of ' + ','.join(METHODS))
  parser.add_argument('--iters', type=int, default=None, help='iterations per layer (with --curve: that point only)')
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
  parser.add_argument('--workdir', default=os.path.join('work', 'llm_ptq'))
  args = parser.parse_args()
  compile_cache.enable(os.path.join(args.workdir, 'jax_cache'))   # identical layers compile once, across runs too
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  if args.curve:   # perplexity vs iterations: W4 per-channel FlexRound (the table's own run is the 250 point)
    runs = [('per_channel', 4, None, 'flexround', n, os.path.join('llm_iters', f'llm_per_channel_w4_flexround_it{n}'))
            for n in ((args.iters,) if args.iters else CURVE_ITERS)]
  else:
    runs = [(g, b, gs, m, args.iters, f'llm_{_tag(g, b, gs)}_{m}') for g, b, gs in SETTINGS
            for m in args.methods.split(',') if not args.only or args.only == _tag(g, b, gs)]
    unknown = set(args.methods.split(',')) - set(METHODS)
    if unknown or not runs:
      parser.error(f'nothing to run: --only {args.only!r} / --methods {args.methods!r} (settings: '
                   f'{[_tag(*setting) for setting in SETTINGS]}, methods: {METHODS})')
  suffix = ('_bf16' if args.compute_dtype == 'bfloat16' else '') + (
      f'_fb{args.fallback_samples}' if args.fallback_samples else '') + (
      '_cachebf16' if args.cache_dtype == 'bfloat16' else '')
  for granularity, bits, group, method, iters, name in runs:
    if suffix:   # beside the float32 table's JSONs, not among them (make_tables reads llm_per_*.json)
      name = os.path.join('llm_precision', os.path.basename(name) + suffix)
    tag = _tag(granularity, bits, group)
    out = os.path.join(args.results_dir, name + '.json')
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.exists(out):
      print(f'skip {out} (exists)')
      continue
    config = load_config()
    q = config.quant
    q.weight.granularity, q.weight.bits, q.weight.group_size = granularity, bits, group
    q.method = {'name': method, **METHOD_KNOBS.get(method, lambda b: {})(bits)}
    if iters is not None:
      q.iters = iters
    if args.max_windows is not None:
      config.task_args.max_windows = args.max_windows
    if args.n_calib is not None:
      config.task_args.n_calib = args.n_calib
    if args.blocks is not None:
      q.blocks = args.blocks
    if args.vocab_chunk is not None:
      config.task_args.vocab_chunk = args.vocab_chunk
    if args.eval_batch is not None:
      config.task_args.eval_batch = args.eval_batch
    q.spill_dir = args.spill_dir and os.path.abspath(args.spill_dir)
    q.num_devices = args.num_devices
    q.compute_dtype, q.fallback_samples, q.cache_dtype = args.compute_dtype, args.fallback_samples, args.cache_dtype
    workdir = os.path.abspath(os.path.join(args.workdir, os.path.basename(name)))
    print(f'== {tag} {method} -> {workdir}', flush=True)
    with provenance.PeakRSS() as rss:
      results = runner.run(config, workdir, phase=rss.mark)
      release_free_host_memory()   # what the run freed, handed back before the export loads the model again
      rss.mark('export_safetensors')
      # Export as packed safetensors; for every method but RTN also reload it and check the perplexity is the same.
      if method != 'rtn':   # made first: its float params are gone before the quantized copies are loaded
        config.task_args.max_windows = EXACT_CHECK_WINDOWS
        prefix = tasks.make(config.task, config.task_args).evaluate
      params_q, qtensors = export.load_orbax(os.path.join(workdir, 'quantized'))
      path = os.path.join(workdir, 'model.safetensors')
      sizes = export.save_safetensors(path, params_q, qtensors, overwrite=True)   # a rerun re-exports, as run.py
      del qtensors
      release_free_host_memory()
      if method != 'rtn':
        rss.mark('export_check')
        # The reloaded export must be the fake-quant model exactly: every parameter bit for bit (so the full
        # perplexity is the same by construction), and, as a direct check, the same perplexity on the first
        # EXACT_CHECK_WINDOWS windows (a second full evaluation would double the run's evaluation time).
        reloaded, _ = export.load_safetensors(path)
        same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), reloaded, params_q)
        ppl_reloaded = prefix(reloaded)['ppl']
        del reloaded
        ppl_fake_quant = prefix(params_q)['ppl']
        results.update({'export_params_bitwise_equal': all(jax.tree.leaves(same)),
                        'export_check_windows': EXACT_CHECK_WINDOWS, 'ppl_prefix_reloaded_export': ppl_reloaded,
                        'ppl_prefix_fake_quant': ppl_fake_quant, 'export_exact': ppl_reloaded == ppl_fake_quant})
    results.update({
        'model': 'SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized = the float baseline)',
        'peak_rss_mb': round(rss.peak_mb, 1), 'rss_phases_mb': rss.phases_mb, 'export_bytes': sizes['file_bytes'],
        'float32_bytes': sizes['float32_bytes'],
        'num_devices': args.num_devices,   # None: all devices, reduced to a divisor of the batch
        'compute_dtype': args.compute_dtype, 'fallback_samples': args.fallback_samples,
        'fixed_cost': fixed_cost(results['report']),
        'memory_options': {'cache_dtype': args.cache_dtype, 'vocab_chunk': args.vocab_chunk, 'eval_batch': config.task_args.eval_batch,
                           'spill_dir': args.spill_dir is not None},
        'host': {**provenance.host_info(), 'bf16_cpu_flags': provenance.bf16_flags(), 'jax': jax.__version__},
    })
    with open(out, 'w') as f:
      json.dump(results, f, indent=2, default=float)
    shutil.rmtree(os.path.join(workdir, 'checkpoints'), ignore_errors=True)
    print(json.dumps({'setting': tag, 'method': method, 'ppl': results['quantized']['ppl'],
                      'quantize_wall_s': results['quantize_wall_s'], 'peak_rss_mb': results['peak_rss_mb']}),
          flush=True)


if __name__ == '__main__':
  main()
