"""The README is short and points into the docs; the quantizer example (docs/methods.md) runs as printed.

(Every python block of the README and the docs pages runs in tests/test_docs.py.)
"""

import os
import re

ROOT = os.path.join(os.path.dirname(__file__), '..')


def _read(path):
  return open(os.path.join(ROOT, path)).read()


def test_quantizer_snippet_runs():
  text = _read(os.path.join('docs', 'methods.md'))
  blocks = re.findall(r'```python\n(.*?)```', text, re.S)
  snippet = next(b for b in blocks if 'flexround.init' in b)
  exec(compile(snippet, 'docs/methods.md', 'exec'), {})  # pylint: disable=exec-used


def test_readme_is_short_and_links_to_docs_pages_that_exist():
  text = _read('README.md')
  assert len(text.splitlines()) <= 250
  links = re.findall(r'\]\((docs/[^)#]+)(?:#[^)]*)?\)', text)
  assert len(set(links)) >= 10, links   # every page of the site
  for link in links:
    assert os.path.exists(os.path.join(ROOT, link)), link


def test_readme_describes_the_library_not_its_history():
  text = _read('README.md')
  for history in (r'\bissue[- ]?\d+', r'last stop', r'\bsession\b', r'previous session'):
    assert not re.search(history, text, re.I), history
