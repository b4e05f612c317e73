"""Sentences from the Wikipedia sample (``flexround_jax.data.wiki``): calibration and evaluation text for encoders.

Splitter (``split_sentences``, deterministic, rule-based): an article is cut into lines; headings (``== ... ==``),
list, table and indented lines (starting with ``* # : ; | ! {``) are dropped; each remaining line is split after
``.``, ``!`` or ``?`` (optionally followed by a closing quote or bracket) when whitespace and then an upper-case
letter, digit, quote or opening bracket follow, except after a common abbreviation (``Dr.``, ``e.g.``, ...) or a
single-letter initial. Whitespace is collapsed. ``is_prose`` then keeps sentences of ``MIN_WORDS``..``MAX_WORDS``
words that start with an upper-case letter, digit or quote and end with terminal punctuation, which removes
captions, table cells and other markup left-overs.

Selection (``interleave``): sentence j of every article in turn (article order), j = 0, 1, ..., so that a prefix of
the stream covers all articles rather than the first few. One sentence is one sequence (no packing): the sequences
look like what the sentence encoder embeds at evaluation. Calibration sentences come only from
``wiki.calibration_articles()`` (first 80), evaluation sentences only from ``wiki.evaluation_articles()`` (last 25).
"""

from __future__ import annotations

import functools
import itertools
import re
from typing import Sequence

from flexround_jax.data import wiki

MIN_WORDS = 8
MAX_WORDS = 80
N_CALIBRATION = 512
N_EVALUATION = 1000

_ABBREVIATIONS = frozenset(
    'mr mrs ms dr prof st jr sr vs etc e.g i.e c ca no nos vol pp fig approx est al gen col lt sgt capt rev gov '
    'jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k'.split())
_SKIP_LINE = re.compile(r'^\s*([=*#:;|!{]|\s)')
_BOUNDARY = re.compile(r'[.!?]["\'”’)\]]?\s+(?=["\'“‘(\[]?[A-Z0-9])')
_PROSE = re.compile(r'^["\'“‘(]?[A-Z0-9].*[.!?]["\'”’)\]]?$')


def _ends_with_abbreviation(text: str) -> bool:
  last = text.rsplit(None, 1)[-1].rstrip('.').lstrip('("\'').lower()
  return last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha())


def split_sentences(text: str) -> list[str]:
  """The sentences of one article's text, in order (see the module docstring for the rules)."""
  sentences = []
  for line in text.split('\n'):
    if not line.strip() or _SKIP_LINE.match(line):
      continue
    line = ' '.join(line.split())
    start = 0
    for m in _BOUNDARY.finditer(line):
      candidate = line[start:m.end()].strip()
      if _ends_with_abbreviation(line[start:m.start() + 1]):
        continue
      sentences.append(candidate)
      start = m.end()
    if line[start:].strip():
      sentences.append(line[start:].strip())
  return sentences


def is_prose(sentence: str, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> bool:
  """A full sentence of min_words..max_words words: capitalised start, terminal punctuation at the end."""
  return min_words <= len(sentence.split()) <= max_words and bool(_PROSE.match(sentence))


def interleave(per_article: Sequence[Sequence[str]]) -> list[str]:
  """Sentence 0 of each article, then sentence 1 of each, ... (articles that run out are skipped)."""
  return [s for round_ in itertools.zip_longest(*per_article) for s in round_ if s is not None]


@functools.lru_cache(maxsize=4)
def prose_sentences(split: str, min_words: int = MIN_WORDS) -> tuple[str, ...]:
  """All interleaved prose sentences of the 'calibration' or 'evaluation' articles."""
  if split not in ('calibration', 'evaluation'):
    raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
  arts = wiki.calibration_articles() if split == 'calibration' else wiki.evaluation_articles()
  return tuple(interleave([[s for s in split_sentences(a) if is_prose(s, min_words)] for a in arts]))


def calibration_sentences(n: int = N_CALIBRATION, min_words: int = MIN_WORDS) -> list[str]:
  """The first n interleaved prose sentences of the 80 calibration articles."""
  return _take(prose_sentences('calibration', min_words), n, 'calibration')


def evaluation_sentences(n: int = N_EVALUATION, min_words: int = MIN_WORDS) -> list[str]:
  """The first n interleaved prose sentences of the 25 evaluation articles (disjoint from calibration)."""
  return _take(prose_sentences('evaluation', min_words), n, 'evaluation')


def _take(stream, n, which):
  if n > len(stream):
    raise ValueError(f'asked for {n} {which} sentences, the {which} articles hold only {len(stream)}')
  return list(stream[:n])
