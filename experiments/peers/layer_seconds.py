r"""Per-layer seconds of an AutoRound run, read from its log, added to the run's result JSON.

AutoRound reports only its whole tuning time. Its progress bar ("Quantizing model.layers.N: k/30 [mm:ss<...") prints
the elapsed time after each decoder layer, so the differences are the per-layer times, all included: the layer's
tuning steps and AutoRound's own per-layer work (its quantized-input forward for the next layer, best-loss tracking).

  python experiments/peers/layer_seconds.py --log work/peers_queue.log --start 'start ar_w4pc_250x2' \
      --json experiments/results/peers/autoround_per_channel_w4_it250_b2.json

adds ``layer_seconds`` (one per layer; the first carries torch.compile's compilation), ``layer_seconds_median``
(layers 1..) and ``step_ms_all_in`` (that median over the steps per layer) to the JSON. ``--start`` picks the run when
the log holds several: the lines after the first line containing it, up to the next run's end.
"""

import argparse
import json
import re
import statistics

PROGRESS = re.compile(r'Quantizing [\w.]+:[^|\n]*\|[^|\n]*\| (\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<')


def layer_seconds(text: str) -> list[int]:
  """Seconds per layer from the tqdm progress of one run: elapsed at k+1 done minus elapsed at k done."""
  elapsed = {}
  for m in PROGRESS.finditer(text.replace('\r', '\n')):
    done, hours, minutes, seconds = int(m[1]), int(m[3] or 0), int(m[4]), int(m[5])
    elapsed.setdefault(done, 3600 * hours + 60 * minutes + seconds)   # the first print after k layers are done
  total = max(elapsed)
  missing = [k for k in range(total + 1) if k not in elapsed]
  if missing:
    raise SystemExit(f'progress lines missing for layers done = {missing}')
  return [elapsed[k + 1] - elapsed[k] for k in range(total)]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--log', required=True)
  parser.add_argument('--json', required=True)
  parser.add_argument('--start', default=None, help='a string on the line that starts the run in the log')
  args = parser.parse_args()
  text = open(args.log, errors='replace').read()
  if args.start is not None:
    if args.start not in text:
      raise SystemExit(f'{args.start!r} is not in {args.log}')
    text = text[text.index(args.start):]
    end = text.find('=== ', len(args.start) + 4)   # the queue's next marker line
    text = text if end < 0 else text[:end]
  seconds = layer_seconds(text)
  result = json.load(open(args.json))
  median = statistics.median(seconds[1:])
  result.update({'layer_seconds': seconds, 'layer_seconds_median': median,
                 'step_ms_all_in': round(1000 * median / result['autoround']['iters'], 1),
                 'layer_seconds_source': 'the tqdm progress of the run log (experiments/peers/layer_seconds.py)'})
  json.dump(result, open(args.json, 'w'), indent=2)
  print(json.dumps({'layers': len(seconds), 'first': seconds[0], 'median_after_first': median,
                    'step_ms_all_in': result['step_ms_all_in']}))


if __name__ == '__main__':
  main()
