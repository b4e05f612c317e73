"""CPU hosts: one XLA device per core, so the engine's data parallelism uses every core.

On a single CPU device XLA runs a convolution (forward and backward) on about one core; the engine shards
calibration batches over devices, so splitting the host into one device per core uses all of them. The split is an
XLA flag that must be set before JAX starts, so it is an explicit call at the top of a script, never a side effect
of ``import flexround_jax``:

  from flexround_jax import cpu
  cpu.use_all_cores()      # before the first ``import jax`` anywhere in the process
  import jax
"""

from __future__ import annotations

import os
import sys

FLAG = '--xla_force_host_platform_device_count'


def use_all_cores(count: int | None = None) -> int:
  """Sets ``XLA_FLAGS`` so the CPU backend has ``count`` devices (default: the number of cores); returns the count.

  Without ``count``, a device count already in ``XLA_FLAGS`` (e.g. set by a test harness) is kept and returned.
  An explicit ``count`` replaces it. Raises RuntimeError if JAX has already been imported, since XLA reads the flag
  once, when its backend starts.
  """
  if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
    raise ValueError(f'count must be a positive integer, got {count!r}')
  flags = os.environ.get('XLA_FLAGS', '')
  preset = [f for f in flags.split() if f.startswith(FLAG + '=')]
  if preset and count is None:
    return int(preset[-1].split('=', 1)[1])
  if 'jax' in sys.modules:
    raise RuntimeError('flexround_jax.cpu.use_all_cores() must run before jax is imported (XLA reads XLA_FLAGS '
                       'once, when its backend starts)')
  count = count or os.cpu_count() or 1
  flags = ' '.join(f for f in flags.split() if not f.startswith(FLAG + '='))
  os.environ['XLA_FLAGS'] = f'{flags} {FLAG}={count}'.strip()
  return count
