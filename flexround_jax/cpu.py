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

  Leaves the flags alone (and returns the count they already set, or 1) when a device count is already set, e.g.
  by a test harness. Raises RuntimeError if JAX has already been imported, since the flag would be ignored.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if FLAG in flags:
    value = flags.split(FLAG + '=', 1)[1].split()[0] if FLAG + '=' in flags else '1'
    return int(value)
  if 'jax' in sys.modules:
    raise RuntimeError('flexround_jax.cpu.use_all_cores() must run before jax is imported (XLA reads XLA_FLAGS '
                       'once, when its backend starts)')
  count = count or os.cpu_count() or 1
  if count < 1:
    raise ValueError(f'count must be a positive integer, got {count!r}')
  if count > 1:
    os.environ['XLA_FLAGS'] = f'{flags} {FLAG}={count}'.strip()
  return count
