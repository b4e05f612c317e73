"""What a result JSON records about how it was made: the git commit, the machine, and the peak resident memory."""

import os
import platform
import subprocess
import threading

import jax
import psutil


def git_commit() -> str:
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=here, capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def host_info() -> dict:
  """The machine a run's wall times belong to: CPU model, core count, JAX backend and device count."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
  except OSError:
    pass
  return {'cpu': cpu, 'cpu_count': os.cpu_count(), 'backend': jax.default_backend(),
          'devices': jax.device_count()}


def bf16_flags() -> list[str]:
  """The host CPU's bfloat16 matmul flags present in /proc/cpuinfo ('amx_bf16', 'avx512_bf16'; [] elsewhere)."""
  try:
    with open('/proc/cpuinfo') as f:
      words = set(f.read().split())
  except OSError:
    return []
  return [flag for flag in ('amx_bf16', 'avx512_bf16') if flag in words]


class PeakRSS:
  """Context manager that samples this process's resident memory every ``every_s`` seconds.

  ``peak_mb`` is the highest sample taken inside the ``with`` block, so one process can measure several runs.
  ``peak_anon_mb`` is the highest sample of the resident memory that is not file-backed (RSS minus shared pages on
  Linux): pages of memory-mapped files count in RSS while mapped but the kernel drops them under pressure, so a
  run over memory-mapped params needs ``peak_anon_mb`` of RAM, not ``peak_mb``.
  ``mark(name)`` starts a phase: ``phases_mb`` is {phase: highest sample taken while it was the latest mark} in
  mark order (samples before the first mark go to 'start'), the way to see where a run's peak is (tracemalloc does
  not see XLA's buffers).
  """

  def __init__(self, every_s: float = 0.2):
    self.peak_bytes, self.peak_anon_bytes, self._every, self._stop = 0, 0, every_s, threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._phase, self._phase_peaks = 'start', {}

  def _take(self, proc):
    info = proc.memory_info()
    self.peak_bytes = max(self.peak_bytes, info.rss)
    self.peak_anon_bytes = max(self.peak_anon_bytes, info.rss - getattr(info, 'shared', 0))
    self._phase_peaks[self._phase] = max(self._phase_peaks.get(self._phase, 0), info.rss)

  def _sample(self):
    proc = psutil.Process()
    while not self._stop.is_set():
      self._take(proc)
      self._stop.wait(self._every)

  def mark(self, phase: str):
    """Ends the current phase (with a last sample) and starts ``phase`` (a repeated name keeps its highest peak)."""
    self._take(psutil.Process())
    self._phase = phase

  @property
  def phases_mb(self) -> dict[str, float]:
    return {name: round(peak / 2**20, 1) for name, peak in self._phase_peaks.items()}

  @property
  def peak_mb(self) -> float:
    return self.peak_bytes / 2**20

  @property
  def peak_anon_mb(self) -> float:
    return self.peak_anon_bytes / 2**20

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self._take(psutil.Process())
