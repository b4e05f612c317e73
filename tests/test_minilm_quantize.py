"""End to end on the real pretrained MiniLM-L6: FlexRound lowers every layer's loss below RTN's start."""

import ml_collections
import numpy as np

import flexround_jax as fr
from flexround_jax import tasks
from flexround_jax.data import sentences
from flexround_jax.evals import sentence_cosine
from flexround_jax.models import bert


def test_minilm_w4_flexround_beats_rtn_layer_by_layer():
  task = tasks.make('minilm', ml_collections.ConfigDict({'n_calib': 64, 'calib_len': 32, 'n_eval': 50}))
  spec = fr.QuantSpec(bits=4, granularity='per_channel', grid_init='mse')
  cfg = fr.QuantConfig(method='flexround', weight=spec, blocks=task.blocks, iters=40, batch_size=8, progress=False)
  result = fr.quantize(task.params, task.apply_fn, task.calib, cfg)
  assert [r['unit'] for r in result.report] == [f'encoder/layer_{i}' for i in range(6)]
  assert len(result.qtensors) == 36
  for r in result.report:
    assert r['loss_trained'] < r['loss_rtn'], r
  texts = sentences.evaluation_sentences(50)
  fp = bert.text_embedder(task.params)(texts)
  q = bert.text_embedder(result.params)(texts)
  assert np.mean(sentence_cosine.cosines(fp, q)) > 0.9
