"""Optional dependencies: imported on first use; when one is missing, the error names the extra that installs it.

The core install (``pip install flexround_jax``) quantizes, runs configs and exports to safetensors, Orbax and
compressed-tensors. Everything else is an extra of pyproject.toml: ``data`` (TFDS, gensim, scipy, tokenizers),
``llm`` (gguf, tokenizers), ``plots`` (matplotlib), ``qwix``. Library modules never import these at module level;
they call ``require`` where needed.
"""

from __future__ import annotations

import importlib
import importlib.util
import types

# Import name -> distribution name on PyPI, where they differ.
DISTRIBUTIONS = {'tensorflow_datasets': 'tensorflow-datasets'}


def missing(module: str, extra: str, needed_for: str = '') -> ModuleNotFoundError:
  """The error for an absent optional ``module``: what needs it, and ``pip install 'flexround_jax[extra]'``."""
  top = module.split('.')[0]
  why = f' ({needed_for})' if needed_for else ''
  return ModuleNotFoundError(f"{DISTRIBUTIONS.get(top, top)} is not installed{why}; it comes with the {extra!r} "
                             f"extra: pip install 'flexround_jax[{extra}]'", name=top)


def require(module: str, extra: str, needed_for: str = '') -> types.ModuleType:
  """``importlib.import_module(module)``; ModuleNotFoundError (an ImportError) naming ``extra`` if it is absent.

  Only a missing ``module`` itself (or its top-level package) becomes that message; an error inside an installed
  package propagates unchanged.
  """
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    parts = module.split('.')
    if e.name not in {'.'.join(parts[:i]) for i in range(1, len(parts) + 1)}:
      raise
    raise missing(module, extra, needed_for) from e


def available(module: str) -> bool:
  """Whether ``module``'s top-level package is installed (found on the path; nothing is imported)."""
  return importlib.util.find_spec(module.split('.')[0]) is not None
