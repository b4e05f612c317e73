"""Fashion-MNIST PTQ table (the paper's weight-only ImageNet table, shape reproduced on real data):
{ResNet, MobileNetV2} x {per-tensor, per-channel} x {W4, W3, W2} x {RTN, AdaRound, FlexRound}, 3 seeds for the
learned methods. One JSON per run: experiments/results/image_<model>_<granularity>_w<bits>_<method>_s<seed>.json.
Existing JSONs are skipped (the sweep resumes). The table runs seed 0 of every setting before seeds 1 and 2, so
an interrupted sweep still leaves a complete one-seed table.

FlexRound's learning rate is chosen once per model (``--mode lr``: LR_GRID at LR_SETTING, scored on the
validation split carved out of the training set, never on test) and written to experiments/results/image_lr.json;
the table uses that one rate for every setting of the model. A full grid per setting (36 runs) does not fit the
2-core budget; the official code likewise uses one rate per model and bit width.

  python experiments/image_ptq.py --mode lr       # FlexRound lr per model on the validation split
  python experiments/image_ptq.py                 # the table (test split)
  python experiments/image_ptq.py --mode iters    # accuracy vs iterations, ResNet per-tensor W3
  python experiments/image_ptq.py --mode ablate --setting resnet_per_tensor_w2   # FlexRound knobs, validation
  python experiments/image_ptq.py --mode wa       # W4A4 / W2A4, the QDrop setting (test split)

``--mode wa`` is the paper's "Q + X" setting (QDrop's W/A configs): per-channel weights with the Lp-searched grid,
every kernel's input quantized by QDrop's LSQ step (Lp-2.4 search on 256 calibration images of the float model,
learned jointly with the weights, Adam 4e-5 cosine), QDrop mixing with drop_prob 0.5 at the block inputs and at
every input quantizer, the stem and head weights at 8 bits, the head's input at 8 bits and the stem's input (the
image) float. RTN: RTN weights with the calibrated activation grids (nothing trained). One JSON per run:
image_<model>_per_channel_w<bits>a<abits>_<method>_s<seed>.json.
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
RESULTS = os.path.join(HERE, 'results')
MODELS = ('resnet', 'mobilenetv2')
GRANULARITIES = ('per_tensor', 'per_channel')
BITS = (4, 3, 2)
SEEDS = (0, 1, 2)
WA_SETTINGS = ((4, 4), (2, 4))   # (weight bits, activation bits), the QDrop repository's W/A configs
LR_GRID = (1e-3, 3e-3, 1e-2)
LR_SETTING = ('per_tensor', 3)   # where the rate is chosen: the paper's main granularity, a low bit width
ADAROUND_LAMBDA = {'resnet': 0.01, 'mobilenetv2': 0.1}
METHOD_KNOBS = ('lr_s1',)          # overrides that are the method's own knobs
WEIGHT_FIELDS = ('grid_init',)     # overrides of the weight QuantSpec
# --mode ablate: FlexRound's knobs one at a time at one setting, scored on the validation split (diagnosis, not
# tuning: the table keeps its validated rate). name -> (method, overrides of config.quant; 'lr_div' / 'lr_s1_div':
# FlexRound's rate / a separate rate for s1, as the validated rate divided by that number).
ABLATIONS = {   # in run order: the cheap, most telling ones first
    'flexround': ('flexround', {}),
    'adaround': ('adaround', {}),
    'flexround_lr_div3': ('flexround', {'lr_div': 3.0}),
    'flexround_lr_s1_div10': ('flexround', {'lr_s1_div': 10.0}),
    'flexround_drop0.5': ('flexround', {'drop_prob': 0.5}),
    'flexround_minmax_init': ('flexround', {'grid_init': 'minmax'}),
    'flexround_iters4000': ('flexround', {'iters': 4000}),
}


def load_config():
  return runner.load_config_file(os.path.join(HERE, '..', 'configs', 'image.py'))


def _validated_lr(lr_path, model):
  """The FlexRound learning rate chosen for ``model`` by --mode lr; an error (before any work) when missing."""
  chosen = json.load(open(lr_path)) if os.path.exists(lr_path) else {}
  if model not in chosen:
    raise SystemExit(f'no validated FlexRound learning rate for {model!r} in {lr_path}: run '
                     f'`python experiments/image_ptq.py --mode lr --models {model}` first')
  return chosen[model]['lr']


def wa_overrides(abits: int) -> dict:
  """QuantConfig fields of the QDrop setting with ``abits``-bit inputs (see the module docstring)."""
  return {'activation': {'name': 'lsq', 'bits': abits},
          'rules': [{'pattern': 'stem', 'bits': 8, 'activation': 'float'},
                    {'pattern': 'head', 'bits': 8, 'activation': {'name': 'lsq', 'bits': 8}}],
          'drop_prob': 0.5}


def run_one(out, workdir, model, granularity, bits, method, seed, lr=None, eval_split='test', overrides=None):
  if os.path.exists(out):
    print(f'skip {out} (exists)')
    return json.load(open(out))
  config = load_config()
  config.task_args.model, config.task_args.eval_split = model, eval_split
  q = config.quant
  q.weight.granularity, q.weight.bits, q.seed = granularity, bits, seed
  knobs = {'reg': ADAROUND_LAMBDA[model]} if method == 'adaround' else {}
  if lr is not None:
    knobs['lr'] = lr
  for name, value in (overrides or {}).items():
    if name in METHOD_KNOBS:
      knobs[name] = value
    elif name in WEIGHT_FIELDS:
      setattr(q.weight, name, value)
    else:
      setattr(q, name, value)
  q.method = {'name': method, **knobs}
  os.makedirs(os.path.dirname(out), exist_ok=True)
  print(f'== {os.path.basename(out)}', flush=True)
  results = runner.run(config, workdir)
  results.update({'model': model, 'lr': lr, 'overrides': dict(overrides or {})})
  with open(out, 'w') as f:
    json.dump(results, f, indent=2, default=float)
  shutil.rmtree(os.path.join(workdir, 'checkpoints'), ignore_errors=True)
  print(json.dumps({'run': os.path.basename(out), 'top1': results['quantized']['top1'],
                    'fp_top1': results['fp'].get('top1'), 'wall_s': results['quantize_wall_s']}), flush=True)
  return results


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--mode', default='table', choices=['table', 'lr', 'iters', 'ablate', 'wa'])
  parser.add_argument('--models', default=','.join(MODELS))
  parser.add_argument('--seeds', default=','.join(map(str, SEEDS)), help='table mode: learned-method seeds to run')
  parser.add_argument('--setting', default='resnet_per_tensor_w2',
                      help='--mode ablate: <model>_<per_tensor|per_channel>_w<bits>')
  parser.add_argument('--variants', default=','.join(ABLATIONS), help='--mode ablate: which of ABLATIONS to run')
  parser.add_argument('--workdir', default=os.path.join('work', 'image_ptq'))
  args = parser.parse_args()
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  os.makedirs(RESULTS, exist_ok=True)
  models = args.models.split(',')
  if set(models) - set(MODELS):
    parser.error(f'unknown --models {sorted(set(models) - set(MODELS))}; choose from {MODELS}')
  lr_path = os.path.join(RESULTS, 'image_lr.json')

  if args.mode == 'lr':
    chosen = json.load(open(lr_path)) if os.path.exists(lr_path) else {}
    granularity, bits = LR_SETTING
    for model in models:
      scores = {}
      for lr in LR_GRID:
        tag = f'{model}_{granularity}_w{bits}_flexround_lr{lr:g}'
        r = run_one(os.path.join(RESULTS, 'lr', f'image_{tag}.json'), os.path.join(args.workdir, 'lr', tag),
                    model, granularity, bits, 'flexround', 0, lr=lr, eval_split='validation')
        scores[f'{lr:g}'] = r['quantized']['top1']
      chosen[model] = {'lr': float(max(scores, key=scores.get)), 'chosen_at': f'{granularity}_w{bits}',
                       'validation_top1': scores}
      with open(lr_path, 'w') as f:
        json.dump(chosen, f, indent=2)
    return

  if args.mode == 'iters':
    for iters in (250, 500, 1000, 4000):   # 2000 is the table's seed-0 run
      for method in ('flexround', 'adaround'):
        tag = f'resnet_per_tensor_w3_{method}_it{iters}'
        lr = _validated_lr(lr_path, 'resnet') if method == 'flexround' else None
        run_one(os.path.join(RESULTS, 'iters', f'image_{tag}.json'), os.path.join(args.workdir, 'iters', tag),
                'resnet', 'per_tensor', 3, method, 0, lr=lr, overrides={'iters': iters})
    return

  if args.mode == 'ablate':
    model, rest = args.setting.split('_', 1)
    granularity, bits = rest.rsplit('_w', 1) if '_w' in rest else (rest, '')
    if model not in MODELS or granularity not in GRANULARITIES or not bits.isdigit():
      parser.error(f'--setting {args.setting!r}: expected <model>_<granularity>_w<bits>, e.g. resnet_per_tensor_w2')
    variants = args.variants.split(',')
    if set(variants) - set(ABLATIONS):
      parser.error(f'unknown --variants {sorted(set(variants) - set(ABLATIONS))}; choose from {list(ABLATIONS)}')
    lr = _validated_lr(lr_path, model)
    for name in variants:
      method, overrides = ABLATIONS[name]
      overrides = dict(overrides)
      if 'lr_s1_div' in overrides:
        overrides['lr_s1'] = lr / overrides.pop('lr_s1_div')
      run_lr = lr / overrides.pop('lr_div', 1.0)
      tag = f'{args.setting}_{name}'
      run_one(os.path.join(RESULTS, 'ablate', f'image_{tag}.json'), os.path.join(args.workdir, 'ablate', tag),
              model, granularity, int(bits), method, 0, lr=run_lr if method == 'flexround' else None,
              eval_split='validation', overrides=overrides)
    return

  lrs = {model: _validated_lr(lr_path, model) for model in models}   # all checked before any work
  wanted = tuple(int(x) for x in args.seeds.split(','))
  if set(wanted) - set(SEEDS):
    parser.error(f'unknown --seeds {sorted(set(wanted) - set(SEEDS))}; choose from {SEEDS}')
  if args.mode == 'wa':
    for seeds in ((0,), SEEDS[1:]):   # seed 0 of every setting first
      seeds = tuple(s for s in seeds if s in wanted)
      for model in models:
        for bits, abits in WA_SETTINGS:
          for method in ('rtn', 'flexround', 'adaround'):
            for seed in (seeds if method != 'rtn' else (0,) if 0 in wanted else ()):
              tag = f'{model}_per_channel_w{bits}a{abits}_{method}_s{seed}'
              run_one(os.path.join(RESULTS, f'image_{tag}.json'), os.path.join(args.workdir, tag), model,
                      'per_channel', bits, method, seed, lr=lrs[model] if method == 'flexround' else None,
                      overrides=wa_overrides(abits))
    return
  for seeds in ((0,), SEEDS[1:]):   # seed 0 of every setting first: a complete one-seed table early
    seeds = tuple(s for s in seeds if s in wanted)
    for model in models:
      lr = lrs[model]
      for bits in BITS:
        for granularity in GRANULARITIES:
          key = f'{model}_{granularity}_w{bits}'
          for method in ('rtn', 'flexround', 'adaround'):
            for seed in (seeds if method != 'rtn' else (0,) if 0 in wanted else ()):
              tag = f'{key}_{method}_s{seed}'
              run_one(os.path.join(RESULTS, f'image_{tag}.json'), os.path.join(args.workdir, tag), model,
                      granularity, bits, method, seed, lr=lr if method == 'flexround' else None)


if __name__ == '__main__':
  main()
