"""MiniLM-L6 (all-MiniLM-L6-v2) in Flax: parity with the published output, params layout, layer calls, evals, data."""

import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from flexround_jax.data import sentences
from flexround_jax.evals import sentence_cosine
from flexround_jax.evals import word_similarity as ws
from flexround_jax.models import bert


@pytest.fixture(scope='module')
def minilm():
  _, params, config = bert.load_minilm()
  return params, config


@pytest.fixture(scope='module')
def embed_texts(minilm):
  return bert.text_embedder(minilm[0])


def test_matches_sentence_transformers_readme(embed_texts):
  e = embed_texts(['A man is eating food.', 'A man is eating a piece of bread.',
                   'The new movie is awesome', 'The new film is so great!'])
  np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-5)
  assert abs(e[0] @ e[1] - 0.7553) < 1e-3
  assert abs(e[2] @ e[3] - 0.83) < 0.02
  assert abs(e[0] @ e[2]) < 0.1


def test_config_and_param_tree(minilm):
  params, config = minilm
  assert config == bert.MINILM_CONFIG
  flat = {'/'.join(k.key for k in kp): x.shape for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert sum(int(np.prod(s)) for s in flat.values()) == 22_713_216 - 384 * 384 - 384   # the safetensors, no pooler
  kernels = {k: s for k, s in flat.items() if k.endswith('/kernel')}
  assert len(kernels) == 36 and all(re.match(r'encoder/layer_\d+/', k) for k in kernels)
  assert sorted(params['encoder']) == [f'layer_{i}' for i in range(6)]
  assert set(params['embeddings']) == {'word_embeddings', 'position_embeddings', 'token_type_embeddings', 'norm'}
  shapes = {'query': (384, 384), 'key': (384, 384), 'value': (384, 384), 'attention_output': (384, 384),
            'intermediate': (384, 1536), 'output': (1536, 384)}
  for i in range(6):
    for name, shape in shapes.items():
      assert kernels[f'encoder/layer_{i}/{name}/kernel'] == shape


def test_layers_are_chained_calls_on_batch_arrays(minilm):
  """What block reconstruction relies on: one call per encoder/layer_i, args (B, T, H) and (B, T), chained."""
  params, _ = minilm
  batch = bert.encode(['One short sentence.', 'And a second, somewhat longer sentence here.'], 16)
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__':
      calls.append(('/'.join(context.module.path), args, kwargs, out))
    return out

  with nn.intercept_methods(record):
    bert.embed(params, batch)
  layers = [c for c in calls if re.fullmatch(r'encoder/layer_\d+', c[0])]
  assert [c[0] for c in layers] == [f'encoder/layer_{i}' for i in range(6)]
  for i, (_, args, kwargs, out) in enumerate(layers):
    assert not kwargs and [a.shape for a in args] == [(2, 16, 384), (2, 16)] and out.shape == (2, 16, 384)
    if i:
      np.testing.assert_array_equal(args[0], layers[i - 1][3])
  dense = [c for c in calls if c[0].startswith('encoder/layer_') and c[0].count('/') == 2 and 'norm' not in c[0]]
  assert len(dense) == 36


def test_embed_jit_padding_and_buckets(minilm, embed_texts):
  params, _ = minilm
  texts = ['A man is eating food.', 'Padding must not change an embedding.']
  short, long_ = bert.encode(texts, 128, bucket=True), bert.encode(texts, 32)
  assert short['input_ids'].shape == (2, 16) and short['input_ids'].dtype == np.int32
  a, b = bert.embed(params, short), bert.embed_jit(params, long_)
  np.testing.assert_allclose(a, b, atol=2e-5)
  padded = {k: np.concatenate([v, np.zeros_like(v)]) for k, v in long_.items()}   # empty rows: finite, ignored
  c = np.asarray(bert.embed_jit(params, padded))
  assert np.isfinite(c).all()
  np.testing.assert_allclose(c[:2], b, atol=2e-5)
  np.testing.assert_allclose(embed_texts(texts[::-1]), b[::-1], atol=2e-5)   # sorted by length, put back in order


def test_encode_truncates_and_keeps_sep():
  batch = bert.encode(['word ' * 300], 128)
  ids = batch['input_ids'][0]
  assert batch['attention_mask'].sum() == 128 and ids[0] == 101 and ids[-1] == 102   # [CLS] ... [SEP]


def test_params_from_hf_rejects_missing_and_extra():
  w = {'embeddings.word_embeddings.weight': np.zeros((10, 8), np.float32)}
  cfg = bert.BertConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16)
  with pytest.raises(ValueError, match='lack'):
    bert.params_from_hf(w, cfg)
  with pytest.raises(ValueError, match='divisible'):
    bert.BertConfig(hidden_size=10, num_heads=3)


def test_word_similarity_float_baseline(embed_texts):
  rho = ws.word_similarity(embed_texts)
  assert abs(rho['simlex999'] - 0.446) < 0.01
  assert abs(rho['wordsim353'] - 0.729) < 0.01


def test_word_pairs_load():
  pairs, scores = ws.load_pairs('simlex999')
  assert len(pairs) == 999 and pairs[0] == ('old', 'new') and scores[0] == pytest.approx(1.58)
  assert len(ws.load_pairs('wordsim353')[0]) == 353


def test_sentences_split_and_select():
  assert sentences.split_sentences('Dr. Smith met J. R. R. Tolkien, e.g. at lunch. "Yes!" she said.\n== Notes ==\n'
                                   '* a list item. Two.\nThe U.S. Army won in 1945. 1946 was calm.') == [
                                       'Dr. Smith met J. R. R. Tolkien, e.g. at lunch.', '"Yes!" she said.',
                                       'The U.S. Army won in 1945.', '1946 was calm.']
  assert sentences.interleave([['a1', 'a2'], ['b1'], ['c1', 'c2', 'c3']]) == ['a1', 'b1', 'c1', 'a2', 'c2', 'c3']
  calib, evals = sentences.calibration_sentences(), sentences.evaluation_sentences()
  assert len(calib) == 512 and len(evals) == 1000 and not set(calib) & set(evals)
  assert all(sentences.is_prose(s) for s in calib + evals)
  assert calib == sentences.calibration_sentences()


def test_mean_cosine_weights_every_row_once():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(10, 6))
  noise = rng.normal(size=(10, 6))
  batches = [slice(0, 1), slice(1, 10)]
  got = sentence_cosine.mean_cosine(lambda s: x[s], lambda s: x[s] + noise[s], batches)
  want = np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(x, x + noise)])
  assert got == pytest.approx(want) and sentence_cosine.mean_cosine(lambda s: x[s], lambda s: 3 * x[s],
                                                                    batches) == pytest.approx(1.0)
