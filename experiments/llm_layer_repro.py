"""Isolates what moves SmolLM2's W4 FlexRound result between code versions: reconstructs the first ``--layers``
decoder layers alone (the table's setting: per-channel W4, 250 steps, lr 3e-3, same calibration, seed and device
count; later layers kept float) with the current engine and either attention layout, and prints each layer's RTN
and final block loss next to the committed run's (experiments/results/llm_per_channel_w4_flexround.json).

  python experiments/llm_layer_repro.py --layers 1 --attention folded,unfolded

'folded': ``llama.Attention.attend`` as it is (query groups folded into rows, issue 18); 'unfolded': the layout
before issue 18 (``llama.unfolded_attend``: same math, other float rounding). Writes
experiments/results/rerun/llm_layer_repro.json.
"""

from flexround_jax import cpu

cpu.use_all_cores()

# pylint: disable=g-import-not-at-top,wrong-import-position

import argparse
import dataclasses
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

from flexround_jax import provenance, run as runner, tasks
from flexround_jax.engine import Rule, quantize
from flexround_jax.models import llama


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--layers', type=int, default=1)
  parser.add_argument('--attention', default='folded,unfolded')
  args = parser.parse_args()
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  committed = json.load(open(os.path.join(HERE, 'results', 'llm_per_channel_w4_flexround.json')))
  config = runner.load_config_file(os.path.join(HERE, '..', 'configs', 'smollm2.py'))
  config.quant.method = {'name': 'flexround', 'lr': 3e-3}
  task = tasks.make(config.task, config.task_args)
  qcfg = runner.quant_config(config.quant, None)
  later = '|'.join(str(i) for i in range(args.layers, 30))
  qcfg = dataclasses.replace(qcfg, rules=(Rule(rf'layers_({later})(/.*)?', skip=True),), progress=False)
  folded = llama.Attention.attend
  out = {'committed': {u['unit']: [u['loss_rtn'], u['loss_final']] for u in committed['report'][:args.layers]},
         'committed_commit': committed['commit'], 'commit': provenance.git_commit(), 'host': provenance.host_info()}
  for layout in args.attention.split(','):
    llama.Attention.attend = folded if layout == 'folded' else llama.unfolded_attend
    try:
      res = quantize(task.params, task.apply_fn, task.calib, qcfg)
    finally:
      llama.Attention.attend = folded
    out[layout] = {u['unit']: [u['loss_rtn'], u['loss_final']] for u in res.report}
    print(layout, out[layout], 'committed', out['committed'], flush=True)
  os.makedirs(os.path.join(HERE, 'results', 'rerun'), exist_ok=True)
  with open(os.path.join(HERE, 'results', 'rerun', 'llm_layer_repro.json'), 'w') as f:
    json.dump(out, f, indent=2)


if __name__ == '__main__':
  main()
