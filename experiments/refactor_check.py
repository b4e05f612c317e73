"""Same seed, same numbers through a refactor: run committed cells with two checkouts on one host and compare.

  git worktree add /tmp/old d060843            # the code before the methods-as-values refactor
  python experiments/refactor_check.py --old-root /tmp/old [--cells image_resnet_per_tensor_w4_flexround_s0,...]

Each cell runs in its own process, once with the old checkout (PYTHONPATH) and once with this one; the JSONs go
to --out (default work/refactor_check) and the comparison (metrics, and per unit: RTN loss, final loss, loss
curve, bit for bit) to experiments/results/refactor_check.json.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, '..'))
CELLS = ('image_resnet_per_tensor_w4_flexround_s0', 'image_resnet_per_tensor_w2_adaround_s0',
         'minilm_per_channel_w4_flexround')

RUN_CELL = r'''
import os, sys, json, importlib.util
root, cell, out, workdir = sys.argv[1:5]
if root != os.environ['NEW_ROOT']:
  import flexround_jax  # noqa: F401  (the old code split the CPU into devices on import)
else:
  from flexround_jax import cpu
  cpu.use_all_cores()
results_dir = os.path.join(os.environ['NEW_ROOT'], 'experiments', 'results')
if cell.startswith('image'):
  spec = importlib.util.spec_from_file_location('image_ptq', root + '/experiments/image_ptq.py')
  m = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(m)
  _, model, g1, g2, w, method, s = cell.split('_')
  lr = m._validated_lr(os.path.join(results_dir, 'image_lr.json'), model) if method == 'flexround' else None
  m.run_one(out, workdir, model, f'{g1}_{g2}', int(w[1:]), method, int(s[1:]), lr=lr)
else:
  from flexround_jax import run as runner
  config = runner.load_config_file(root + '/configs/minilm.py')
  config.eval_fp = False
  json.dump(runner.run(config, workdir), open(out, 'w'), indent=2, default=float)
'''


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--old-root', required=True, help='checkout of the code before the change')
  parser.add_argument('--cells', default=','.join(CELLS))
  parser.add_argument('--out', default=os.path.join('work', 'refactor_check'))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  summary = []
  for cell in args.cells.split(','):
    runs = {}
    for tag, root in (('old', os.path.abspath(args.old_root)), ('new', ROOT)):
      out = os.path.abspath(os.path.join(args.out, f'{tag}_{cell}.json'))
      if not os.path.exists(out):
        env = {**os.environ, 'PYTHONPATH': root, 'NEW_ROOT': ROOT}
        env.pop('XLA_FLAGS', None)
        subprocess.run([sys.executable, '-c', RUN_CELL, root, cell, out, out[:-5] + '_work'], env=env, check=True)
      runs[tag] = json.load(open(out))
    old, new = runs['old'], runs['new']
    units = [{'unit': a['unit'], 'loss_rtn_equal': a['loss_rtn'] == b['loss_rtn'],
              'loss_final_equal': a['loss_final'] == b['loss_final'], 'loss_curve_equal': a['loss_curve'] == b['loss_curve']}
             for a, b in zip(old['report'], new['report'])]
    summary.append({'cell': cell, 'old': old['quantized'], 'new': new['quantized'],
                    'metrics_equal': old['quantized'] == new['quantized'], 'units': units,
                    'old_commit': old.get('commit'), 'new_commit': new.get('commit'), 'host': new.get('host')})
    print(json.dumps(summary[-1]))
  with open(os.path.join(HERE, 'results', 'refactor_check.json'), 'w') as f:
    json.dump(summary, f, indent=2)


if __name__ == '__main__':
  main()
