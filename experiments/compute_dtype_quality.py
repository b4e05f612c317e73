"""MiniLM-L6 W4 per-channel FlexRound with float32 against bfloat16 compute (``QuantConfig.compute_dtype``), same
seed, same budget: the quality side of issue 35 on a small real model.

Runs ``flexround_jax.run`` on configs/minilm.py twice (``--iters`` steps per layer, ``--n-calib`` calibration
sentences, ``--n-eval`` evaluation sentences) and writes experiments/results/minilm_compute_dtype.json: per
compute dtype the metrics (SimLex-999 / WordSim-353 Spearman, mean cosine to the float embeddings), the per-layer
block losses, the wall times, the codes that differ between the two runs, and the host.

  python experiments/compute_dtype_quality.py [--iters 100] [--n-calib 128] [--n-eval 200] [--workdir work/cdq]
"""

from flexround_jax import cpu

cpu.use_all_cores()   # one XLA device per core, before jax starts

# pylint: disable=g-import-not-at-top,wrong-import-position

import argparse
import json
import os
import shutil

import numpy as np

from flexround_jax import run as runner

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--iters', type=int, default=100)
  parser.add_argument('--n-calib', type=int, default=128)
  parser.add_argument('--n-eval', type=int, default=200)
  parser.add_argument('--workdir', default=os.path.join('work', 'compute_dtype_quality'))
  parser.add_argument('--note', default='')
  args = parser.parse_args()
  import jax
  from flexround_jax import provenance
  from flexround_jax.export import load_orbax
  out = {'machine': {**provenance.host_info(), 'jax': jax.__version__, 'load_average_at_start': os.getloadavg()},
         'setting': 'MiniLM-L6 W4 per-channel FlexRound', 'iters': args.iters, 'n_calib': args.n_calib,
         'n_eval': args.n_eval, 'note': args.note, 'runs': {}}
  codes = {}
  for dtype in ('float32', 'bfloat16'):
    config = runner.load_config_file(os.path.join(HERE, '..', 'configs', 'minilm.py'))
    config.quant.iters = args.iters
    config.quant.compute_dtype = dtype
    config.task_args.n_calib, config.task_args.n_eval = args.n_calib, args.n_eval
    config.eval_fp = False
    workdir = os.path.join(args.workdir, dtype)
    shutil.rmtree(workdir, ignore_errors=True)
    results = runner.run(config, workdir)
    out['runs'][dtype] = {'quantized': results['quantized'], 'quantize_wall_s': results['quantize_wall_s'],
                          'loss_final': [r['loss_final'] for r in results['report']],
                          'loss_rtn': [r['loss_rtn'] for r in results['report']]}
    qtensors = load_orbax(os.path.join(workdir, 'quantized')).qtensors
    codes[dtype] = {n: np.asarray(qt.codes) for n, qt in qtensors.items()}
    print(json.dumps({'compute_dtype': dtype, **out['runs'][dtype]}), flush=True)
  changed = sum(int(np.sum(codes['float32'][n] != codes['bfloat16'][n])) for n in codes['float32'])
  out['codes_changed_fraction'] = round(changed / sum(c.size for c in codes['float32'].values()), 4)
  out['machine']['load_average_at_end'] = os.getloadavg()
  path = os.path.join(HERE, 'results', 'minilm_compute_dtype.json')
  with open(path, 'w') as f:
    json.dump(out, f, indent=2, default=float)
  print(f'codes changed: {out["codes_changed_fraction"]}; wrote {path}')


if __name__ == '__main__':
  main()
