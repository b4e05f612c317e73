"""Per-layer comparison of two SmolLM2 result files (the numbers behind the README's per-layer prose).

    python experiments/compare_layers.py per_channel_w3 gptq_flexround flexround

For each unit: RTN loss, the start loss (GPTQ's, for a combination), the final loss of both runs, final/RTN
and final/start, and which run ends lower. Reads `experiments/results/llm_<setting>_<method>.json`.
"""
import argparse
import json
import pathlib

RESULTS = pathlib.Path(__file__).resolve().parent / 'results'


def _load(setting, method):
  path = RESULTS / f'llm_{setting}_{method}.json'
  if not path.exists():
    raise SystemExit(f'{path} does not exist: run experiments/llm_ptq.py --only {setting} --methods {method}')
  return json.loads(path.read_text())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('setting', help='e.g. per_channel_w3, per_group128_w4')
  parser.add_argument('method', help='the run to describe, e.g. gptq_flexround')
  parser.add_argument('baseline', help='the run to compare with, e.g. flexround')
  args = parser.parse_args()
  run, base = _load(args.setting, args.method), _load(args.setting, args.baseline)
  base_by_unit = {r['unit']: r for r in base['report']}
  print(f"{args.method}: ppl {run['quantized']['ppl']:.2f}   {args.baseline}: ppl {base['quantized']['ppl']:.2f}")
  print(f"{'unit':>10} {'rtn':>10} {'start':>10} {'final':>10} {'base':>10} {'f/rtn':>6} {'b/rtn':>6} "
        f"{'f/start':>7} {'kept':>5} {'wins':>5}")
  ratios, base_ratios, shrink, wins, kept, fell = [], [], [], [], [], []
  for r in run['report']:
    b = base_by_unit[r['unit']]
    start = r.get('loss_start')
    f_start = r['loss_final'] / start if start else float('nan')
    ratios.append(r['loss_final'] / r['loss_rtn'])
    base_ratios.append(b['loss_final'] / b['loss_rtn'])
    if start:
      shrink.append(f_start)
    win = r['loss_final'] < b['loss_final']
    for names, flag in ((wins, win), (kept, r.get('kept_start')), (fell, r.get('fell_back_to_rtn'))):
      if flag:
        names.append(r['unit'])
    print(f"{r['unit']:>10} {r['loss_rtn']:10.4g} {start or float('nan'):10.4g} {r['loss_final']:10.4g} "
          f"{b['loss_final']:10.4g} {ratios[-1]:6.2f} {base_ratios[-1]:6.2f} "
          f"{f_start:7.2f} {str(bool(r.get('kept_start'))):>5} "
          f"{str(win):>5}")
  print(f'final/rtn {min(ratios):.2f}-{max(ratios):.2f} '
        f'({args.baseline}: {min(base_ratios):.2f}-{max(base_ratios):.2f})')
  if shrink:
    print(f'final/start {min(shrink):.2f}-{max(shrink):.2f}')
  print(f'ends below {args.baseline}: {len(wins)} of {len(ratios)} {wins}')
  print(f'kept start: {kept}   fell back to rtn: {fell}')
  print(f"quantize wall {run['quantize_wall_s']:.0f} s, commit {run.get('commit')}")


if __name__ == '__main__':
  main()
