"""``make demo``: quantize a model with RTN and FlexRound and print what each did.

  python -m flexround_jax.demo [--task minilm|toy_mlp] [--bits 4] [--iters N] [--workdir DIR]

Default: the pretrained MiniLM-L6 sentence encoder, W4 per-channel, on a small CPU budget (256 calibration
sentences, 250 steps per layer), scored on SimLex-999, WordSim-353 and the cosine to the float embeddings.

Writes each method's results.json, log and quantized model in a folder of the workdir (default ./work/demo) named by
the settings (``minilm_W4_250iters/{rtn,flexround}``) and says where: a rerun with the same settings resumes its own
run, and other settings start their own.
"""

from __future__ import annotations

from flexround_jax import cpu

if __name__ == '__main__':
  cpu.use_all_cores()   # one XLA device per core, before jax starts

# pylint: disable=g-import-not-at-top,wrong-import-position

import argparse
import json
import os
import time

from flexround_jax import run as runner

DEFAULT_TASK = 'minilm'
CONFIGS = {'minilm': 'minilm.py', 'toy_mlp': 'toy_mlp.py'}
# The demo's budget on top of each config (the configs hold the experiments' settings).
DEMO_BUDGET = {'minilm': {'iters': 250, 'n_calib': 256}, 'toy_mlp': {}}


def _load_config(task: str):
  here = os.path.dirname(os.path.abspath(__file__))
  return runner.load_config_file(os.path.join(here, '..', 'configs', CONFIGS[task]))


def _config(task: str, method: str, bits: int | None, iters: int | None):
  """The demo's runner config: the task's config file with the demo budget and the command line's settings."""
  config = _load_config(task)
  config.quant.method = {'name': method}
  budget = DEMO_BUDGET[task]
  if 'iters' in budget:
    config.quant.iters = budget['iters']
  if 'n_calib' in budget:
    config.task_args.n_calib = budget['n_calib']
  if bits is not None:
    config.quant.weight.bits = bits
  if iters is not None:
    config.quant.iters = iters
  config.eval_fp = method == 'rtn'
  return config


def settings_dir(workdir: str, task: str, bits: int, iters: int) -> str:
  """The folder of one demo setting under ``workdir`` (absolute): 'minilm_W4_250iters'. Each setting has its own
  checkpoints, so a run with other settings never meets a checkpoint of another config."""
  return os.path.abspath(os.path.join(workdir, f'{task}_W{bits}_{iters}iters'))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--task', default=DEFAULT_TASK, choices=sorted(CONFIGS))
  parser.add_argument('--bits', type=int, default=None)
  parser.add_argument('--iters', type=int, default=None)
  parser.add_argument('--workdir', default=os.path.join('work', 'demo'))
  args = parser.parse_args(argv)
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)

  configs = {method: _config(args.task, method, args.bits, args.iters) for method in ('rtn', 'flexround')}
  q = configs['flexround'].quant
  where = settings_dir(args.workdir, args.task, q.weight.bits, q.iters)
  rows = {}
  for method, config in configs.items():
    workdir = os.path.join(where, method)
    t = time.time()
    print(f'== {method}: {args.task}, W{config.quant.weight.bits} {config.quant.weight.granularity}, workdir {workdir}')
    results = runner.run(config, workdir)
    results['wall'] = time.time() - t
    rows[method] = results
  fp = rows['rtn']['fp']
  metrics = list(fp)
  print()
  print(f'{"":12s}' + ''.join(f'{m:>18s}' for m in metrics) + f'{"wall s":>10s}')
  print(f'{"float":12s}' + ''.join(f'{fp[m]:18.5g}' for m in metrics))
  for method, r in rows.items():
    print(f'{method:12s}' + ''.join(f'{r["quantized"][m]:18.5g}' for m in metrics) + f'{r["wall"]:10.1f}')
  print()
  for method in rows:
    print(f'{method}: quantized model and results in {os.path.join(where, method)}')
  summary = {m: {'quantized': r['quantized'], 'wall_s': r['wall']} for m, r in rows.items()}
  summary['fp'] = fp
  with open(os.path.join(where, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)


if __name__ == '__main__':
  main()
