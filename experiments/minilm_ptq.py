"""MiniLM-L6 weight-only PTQ table: RTN / GPTQ / AdaRound / FlexRound x W8 / W4 / W3 x per-channel / per-tensor.

Each setting runs ``flexround_jax.run`` on configs/minilm.py with overrides and writes
experiments/results/minilm_<granularity>_w<bits>_<method>.json (metrics, per-layer report, wall time, commit).
Settings whose JSON exists are skipped, so the sweep resumes; a setting interrupted mid-way resumes from its
per-layer checkpoint in the workdir. Order: most informative first.

  python experiments/minilm_ptq.py [--only per_channel_w4] [--iters N] [--workdir work/minilm_ptq]
  python experiments/minilm_ptq.py --wa [--methods rtn,flexround]   # W8A8 / W4A8

``--wa``: per-channel weights with dynamic per-token asymmetric 8-bit inputs at every quantized kernel (the LRQ
repository's W4A8 activation grid; for a transformer encoder a per-token grid rather than QDrop's static per-tensor
LSQ step, whose Lp search over 256 x 256 candidate grids per input costs about an hour of this 2-core budget at 8
bits). Learned methods reconstruct with the quantized inputs in the loop. Files:
minilm_per_channel_w<bits>a8_<method>.json.
"""

from flexround_jax import cpu

cpu.use_all_cores()   # one XLA device per core, before jax starts

# pylint: disable=g-import-not-at-top,wrong-import-position

import argparse
import json
import os
import shutil

from flexround_jax import run as runner

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = [('per_channel', 4), ('per_channel', 3), ('per_tensor', 4), ('per_channel', 8), ('per_tensor', 3),
            ('per_tensor', 8)]
METHODS = ('rtn', 'flexround', 'adaround', 'gptq')
WA_SETTINGS = [('per_channel', 4, 8), ('per_channel', 8, 8)]   # (granularity, weight bits, activation bits)


def load_config():
  return runner.load_config_file(os.path.join(HERE, '..', 'configs', 'minilm.py'))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--only', default=None, help='e.g. per_channel_w4')
  parser.add_argument('--iters', type=int, default=None)
  parser.add_argument('--methods', default=','.join(METHODS), help='comma-separated subset of ' + ','.join(METHODS))
  parser.add_argument('--workdir', default=os.path.join('work', 'minilm_ptq'))
  parser.add_argument('--wa', action='store_true', help='W8A8 / W4A8 with per-token 8-bit inputs')
  args = parser.parse_args()
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  os.makedirs(os.path.join(HERE, 'results'), exist_ok=True)
  for granularity, bits, abits in (WA_SETTINGS if args.wa else [(g, b, None) for g, b in SETTINGS]):
    tag = f'{granularity}_w{bits}' + (f'a{abits}' if abits else '')
    if args.only and args.only != tag:
      continue
    for method in [m for m in METHODS if m in args.methods.split(',')]:
      out = os.path.join(HERE, 'results', f'minilm_{tag}_{method}.json')
      if os.path.exists(out):
        print(f'skip {out} (exists)')
        continue
      config = load_config()
      config.quant.method = {'name': method}
      config.quant.weight.granularity, config.quant.weight.bits = granularity, bits
      if abits:
        config.quant.activation = {'name': 'per_token', 'bits': abits}
      if args.iters is not None:
        config.quant.iters = args.iters
      config.eval_fp = not os.path.exists(os.path.join(HERE, 'results', 'minilm_fp.json'))
      workdir = os.path.join(args.workdir, f'{tag}_{method}')
      print(f'== {tag} {method} -> {workdir}', flush=True)
      results = runner.run(config, workdir)
      results['model'] = 'all-MiniLM-L6-v2'
      with open(out, 'w') as f:
        json.dump(results, f, indent=2, default=float)
      shutil.rmtree(os.path.join(workdir, 'checkpoints'), ignore_errors=True)
      print(json.dumps({'setting': tag, 'method': method, **results['quantized'],
                        'quantize_wall_s': results['quantize_wall_s']}), flush=True)


if __name__ == '__main__':
  main()
