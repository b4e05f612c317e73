"""JAX's persistent compilation cache, for runs that compile the same steps again (a resumed or repeated run).

Within one ``quantize`` call identical blocks already share their compiled functions; this cache keeps them on
disk, so a re-run or a run resumed after a crash loads the first block's training step instead of compiling it
(seconds to a minute for an LLM decoder layer on CPU). It is a process-wide JAX setting, so it is an explicit call,
never a side effect of importing or calling the library:

  from flexround_jax import compile_cache
  compile_cache.enable('work/jax_cache')

The cache only stores XLA executables keyed by the program, its shapes, the backend and the JAX version; a hit
runs the same executable a fresh compile would build, so results do not change.
"""

from __future__ import annotations

import os


def enable(path: str, min_compile_seconds: float = 1.0) -> str:
  """Stores compiled programs that took at least ``min_compile_seconds`` to compile under ``path`` (created if
  needed) and reuses them in later processes; returns the absolute path."""
  if not isinstance(path, (str, os.PathLike)) or not str(path):
    raise ValueError(f'compile_cache.enable: path must be a folder name, got {path!r}')
  if isinstance(min_compile_seconds, bool) or not isinstance(min_compile_seconds, (int, float)) \
      or not min_compile_seconds >= 0:
    raise ValueError(f'compile_cache.enable: min_compile_seconds must be a number >= 0, got {min_compile_seconds!r}')
  import jax  # pylint: disable=g-import-not-at-top  (after the caller's cpu.use_all_cores())
  path = os.path.abspath(os.fspath(path))
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', float(min_compile_seconds))
  return path
