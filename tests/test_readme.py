"""The README's quantizer example runs as printed."""

import os
import re


def test_readme_quantizer_snippet_runs():
  text = open(os.path.join(os.path.dirname(__file__), '..', 'README.md')).read()
  blocks = re.findall(r'```python\n(.*?)```', text, re.S)
  snippet = next(b for b in blocks if 'flexround.init' in b)
  exec(compile(snippet, 'README.md', 'exec'), {})  # pylint: disable=exec-used
