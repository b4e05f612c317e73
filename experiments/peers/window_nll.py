r"""Per-window NLL of a SmolLM2 perplexity row, stored next to its JSON so that any two rows compare paired
(``evals.perplexity.paired_nll_difference``).

  python experiments/peers/window_nll.py --workdir work/llm_ptq/llm_per_channel_w4_flexround_it200_b8 \
      --json experiments/results/llm_per_channel_w4_flexround_it200_b8.json

scores the quantized model an ``experiments/llm_ptq.py`` run left in its workdir (``quantized/``, the Orbax export)
on the protocol's windows and writes ``<json without .json>.window_nll.txt``: one line per window, the mean NLL of its
tokens 1..511, 12 decimals. It checks exp(mean) against the JSON's perplexity (the same forward and NLL; the
summation order differs, so the last digits may). ``autoround_smollm2.py`` scores with the same function.
"""

import argparse
import json
import math
import os

import jax
import numpy as np

from flexround_jax import export
from flexround_jax.evals import perplexity


def window_nll(apply_fn, params, windows, batch_size: int = 4) -> np.ndarray:
  """(N,) mean NLL per window of tokens 1..T-1: ``perplexity.window_nll`` on the full logits, batch by batch (the
  last batch zero-padded, as ``perplexity.perplexity`` does), so that exp(mean) is the protocol's perplexity."""
  fn = jax.jit(lambda p, t: perplexity.window_nll(apply_fn(p, t), t))
  out = []
  for start in range(0, len(windows), batch_size):
    batch = np.asarray(windows[start:start + batch_size], np.int32)
    real = len(batch)
    if real < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - real, batch.shape[1]), np.int32)])
    out.append(np.asarray(fn(params, batch), np.float64)[:real])
  return np.concatenate(out) / (windows.shape[1] - 1)


def nll_path(json_path: str) -> str:
  return json_path[:-len('.json')] + '.window_nll.txt'


def main():
  from flexround_jax.models import gguf  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='an experiments/llm_ptq.py run\'s workdir (holds quantized/)')
  parser.add_argument('--json', required=True, help='that run\'s result JSON')
  args = parser.parse_args()
  with open(args.json) as f:
    result = json.load(f)
  source = gguf.load_smollm2()
  windows = perplexity.evaluation_windows(source.tokenizer)[:result['quantized']['n_windows']]
  params_q, _ = export.load_orbax(os.path.join(args.workdir, 'quantized'))
  nll = window_nll(source.apply_fn, params_q, windows)
  ppl, reported = math.exp(float(np.mean(nll))), result['quantized']['ppl']
  if abs(ppl / reported - 1) > 1e-4:
    raise SystemExit(f'{args.workdir}: perplexity {ppl} from its quantized/ export, the JSON says {reported}')
  np.savetxt(nll_path(args.json), nll, fmt='%.12f')
  print(f'{nll_path(args.json)}: {len(nll)} windows, ppl {ppl:.4f} (JSON {reported})')


if __name__ == '__main__':
  main()
