"""Every ```python block of README.md and docs/*.md runs as printed.

A page's blocks run in order in one namespace (a later block uses the names of earlier ones), in a temporary working
directory. A block that cannot run here says why on the line before it: ``<!-- not run: REASON -->``. Other fences
(bash, text, yaml) are documentation and are not run, but each must name its language, so that no Python example
escapes the test by leaving its fence bare.
"""

import glob
import os
import re

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
PAGES = ['README.md'] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))
FENCE = re.compile(r'^(?P<indent>[ \t]*)```(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$', re.S | re.M)
NOT_RUN = re.compile(r'^\s*<!--\s*not run\b(?P<rest>.*?)-->\s*$')
LANGUAGES = ('python', 'bash', 'text', 'yaml', 'toml', 'json')


def code_blocks(text: str, page: str) -> list[tuple[int, str, str, str | None]]:
  """(line of the opening fence, language, code, reason it is not run or None) for every fenced block."""
  out = []
  for m in FENCE.finditer(text):
    line = text.count('\n', 0, m.start()) + 1
    lang = m.group('lang').strip()
    if lang not in LANGUAGES:
      raise ValueError(f'{page}:{line}: fence language {lang!r}; use one of {LANGUAGES} (only python blocks run)')
    before = text[:m.start()].rstrip('\n').rsplit('\n', 1)[-1]
    marker = NOT_RUN.match(before)
    reason = None
    if marker:
      reason = marker.group('rest').strip().lstrip(':').strip()
      if not reason:
        raise ValueError(f'{page}:{line}: "<!-- not run -->" needs a reason: <!-- not run: why -->')
    indent = m.group('indent')
    code = '\n'.join(l[len(indent):] if l.startswith(indent) else l for l in m.group('body').split('\n'))
    out.append((line, lang, code, reason))
  return out


def test_pages_parse_and_not_run_markers_give_a_reason():
  """The page parser itself: a bare marker, an unknown fence language are errors; indented fences are found."""
  good = 'x\n<!-- not run: needs a TPU -->\n```python\n1/0\n```\n  ```python\n  y = 1\n  ```\n'
  assert [(l, r) for l, _, _, r in code_blocks(good, 'p')] == [(3, 'needs a TPU'), (6, None)]
  assert code_blocks(good, 'p')[1][2] == 'y = 1\n'
  with pytest.raises(ValueError, match='needs a reason'):
    code_blocks('<!-- not run -->\n```python\n1/0\n```\n', 'p')
  with pytest.raises(ValueError, match='fence language'):
    code_blocks('```\nimport os\n```\n', 'p')
  for page in PAGES:
    code_blocks(open(os.path.join(ROOT, page)).read(), page)   # every page parses


@pytest.mark.parametrize('page', PAGES)
def test_page_code_runs(page, tmp_path, monkeypatch):
  blocks = [b for b in code_blocks(open(os.path.join(ROOT, page)).read(), page) if b[1] == 'python']
  monkeypatch.chdir(tmp_path)
  namespace = {'__name__': f'docs:{page}'}
  ran = 0
  for line, _, code, reason in blocks:
    if reason is not None:
      continue
    try:   # padded with newlines, so a traceback's line numbers are the page's
      exec(compile('\n' * line + code, page, 'exec'), namespace)  # pylint: disable=exec-used
    except Exception as e:
      e.add_note(f'in the python block of {page} at line {line}')
      raise
    ran += 1
  if not ran:
    pytest.skip(f'{page} has no python block to run')
