"""A block's fixed cost in the real SmolLM2 run, with and without ``QuantConfig.fallback_samples``, same process.

The SmolLM2 table's setting (configs/smollm2.py: W4 per-channel FlexRound, 250 steps of batch 2, the 128 x 512
calibration tokens), restricted to the first ``--layers`` decoder layers (the others are skipped by a Rule, so the
run stops there). For each compute dtype and each ``fallback_samples`` (None: every sample; 16: a fixed subset),
one ``fr.quantize`` call, and per layer the report's ``seconds`` (the whole unit) and ``seconds_train`` (its optimizer
steps); the fixed cost is the rest: the float targets, the RTN-start reference loss, the final loss pass that also
makes the next layer's inputs. Medians are over the layers after the first (whose time includes compiling the step).

  python benchmarks/bench_fixed_cost.py [--layers 4] [--iters 250] [--dtypes float32,bfloat16] [--note "..."]

Writes benchmarks/results/fixed_cost_<backend>.json.
"""

from flexround_jax import cpu

cpu.use_all_cores()   # one XLA device per core, before jax starts (the run itself uses one: num_devices=1)

# pylint: disable=g-import-not-at-top,wrong-import-position

import argparse
import json
import os
import resource
import time

import jax
import numpy as np

import flexround_jax as fr
from flexround_jax import provenance, run as runner, tasks

HERE = os.path.dirname(os.path.abspath(__file__))


def one_run(config, task, layers: int, compute_dtype: str, fallback_samples) -> dict:
  q = config.quant.to_dict()
  q.update(num_devices=1, progress=False, compute_dtype=compute_dtype, fallback_samples=fallback_samples,
           checkpoint_dir=None, rules=[{'pattern': rf'layers_(?!({"|".join(map(str, range(layers)))})(/|$))\d+(/.*)?',
                                        'skip': True}])
  cfg = fr.QuantConfig.from_dict(q)
  t0 = time.perf_counter()
  result = fr.quantize(task.params, task.apply_fn, task.calib, cfg)
  wall = time.perf_counter() - t0
  units = [r for r in result.report if r.get('seconds_train')]
  if len(units) != layers:
    raise RuntimeError(f'expected {layers} trained layers, got {[r["unit"] for r in result.report]}')
  warm = units[1:] or units
  unit_s = float(np.median([r['seconds'] for r in warm]))
  fixed_s = float(np.median([r['seconds'] - r['seconds_train'] for r in warm]))
  row = {'compute_dtype': compute_dtype, 'fallback_samples': fallback_samples, 'wall_s': round(wall, 1),
         'median_unit_s': round(unit_s, 2), 'median_fixed_s': round(fixed_s, 2),
         'fixed_share': round(fixed_s / unit_s, 4),
         'units': [{'unit': r['unit'], 'seconds': r['seconds'], 'seconds_train': r['seconds_train'],
                    'loss_rtn': r['loss_rtn'], 'loss_final': r['loss_final'],
                    'loss_final_subset': r.get('loss_final_subset'), 'fell_back_to_rtn': r['fell_back_to_rtn']}
                   for r in units]}
  print(json.dumps({k: v for k, v in row.items() if k != 'units'}), flush=True)
  return row


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--layers', type=int, default=4)
  parser.add_argument('--iters', type=int, default=250)
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--note', default='')
  args = parser.parse_args()
  config = runner.load_config_file(os.path.join(HERE, '..', 'configs', 'smollm2.py'))
  config.quant.iters = args.iters
  task = tasks.make(config.task, config.task_args)
  out = {'machine': {**provenance.host_info(), 'jax': jax.__version__, 'bf16_cpu_flags': provenance.bf16_flags(),
                     'load_average_at_start': os.getloadavg()},
         'setting': f'SmolLM2-135M, W4 per-channel FlexRound, {args.iters} steps of batch 2, '
                    f'{len(task.calib)} x {task.calib.shape[1]} calibration tokens, first {args.layers} layers',
         'note': args.note, 'commit': provenance.git_commit(), 'runs': []}
  for dtype in args.dtypes.split(','):
    for fallback_samples in (None, 16):
      out['runs'].append(one_run(config, task, args.layers, dtype, fallback_samples))
  out['machine']['load_average_at_end'] = os.getloadavg()
  out['peak_rss_mb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  path = os.path.join(HERE, 'results', f'fixed_cost_{jax.default_backend()}.json')
  with open(path, 'w') as f:
    json.dump(out, f, indent=2)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
