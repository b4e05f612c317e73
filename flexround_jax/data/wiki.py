"""English Wikipedia articles shipped inside the gensim wheel (its test data), loaded offline.

The file ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`` holds 206 pages; after dropping
redirects, stripping wiki markup with ``gensim.corpora.wikicorpus.filter_wiki`` and keeping texts longer than 500
characters, 105 articles remain, in file order. The fixed split used throughout the project:
``articles[:80]`` for calibration and ``articles[80:]`` for evaluation.
"""

from __future__ import annotations

import bz2
import functools
import html
import importlib.util
import os
import re

from flexround_jax import _extras

WIKI_FILE = 'enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2'
N_CALIBRATION_ARTICLES = 80
MIN_ARTICLE_CHARS = 500


def gensim_test_data_dir() -> str:
  """The folder of gensim's bundled test data (SimLex-999, WordSim-353, the Wikipedia sample)."""
  spec = importlib.util.find_spec('gensim')
  if spec is None or not spec.submodule_search_locations:
    raise _extras.missing('gensim', 'data', 'it ships the Wikipedia sample and the word-similarity sets')
  return os.path.join(spec.submodule_search_locations[0], 'test', 'test_data')


@functools.lru_cache(maxsize=1)
def articles() -> tuple[str, ...]:
  """The 105 Wikipedia articles (plain text, markup removed), in file order."""
  filter_wiki = _extras.require('gensim.corpora.wikicorpus', 'data').filter_wiki
  path = os.path.join(gensim_test_data_dir(), WIKI_FILE)
  with bz2.open(path, 'rt', encoding='utf-8') as f:
    xml = f.read()
  texts = []
  for raw in re.findall(r'<text[^>]*>(.*?)</text>', xml, re.S):
    if raw.lstrip().upper().startswith('#REDIRECT'):
      continue
    text = re.sub(r"'{2,}", '', filter_wiki(html.unescape(raw))).strip()
    if len(text) > MIN_ARTICLE_CHARS:
      texts.append(text)
  return tuple(texts)


def calibration_articles() -> tuple[str, ...]:
  """``articles()[:80]``: the only articles calibration may see."""
  return articles()[:N_CALIBRATION_ARTICLES]


def evaluation_articles() -> tuple[str, ...]:
  """``articles()[80:]``: held out for evaluation (25 articles)."""
  return articles()[N_CALIBRATION_ARTICLES:]
