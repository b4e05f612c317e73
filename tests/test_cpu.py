"""``import flexround_jax`` changes no global state; ``cpu.use_all_cores`` is the explicit way to split a CPU host."""

import os
import subprocess
import sys

import pytest

from flexround_jax import cpu

ROOT = os.path.join(os.path.dirname(__file__), '..')


def _python(code: str, env_flags: str | None = None) -> str:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  if env_flags is not None:
    env['XLA_FLAGS'] = env_flags
  return subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True,
                        check=True).stdout.strip()


def test_import_changes_no_global_state_and_does_not_start_jax():
  out = _python('import os, sys, flexround_jax as fr\n'
                'print("jax" in sys.modules, os.environ.get("XLA_FLAGS"))\n'
                'fr.QuantSpec\n'
                'import jax\n'
                'print(jax.device_count())')
  assert out.splitlines() == ['False None', '1']


def test_use_all_cores_sets_the_device_count_before_jax_starts():
  assert _python('from flexround_jax import cpu\nprint(cpu.use_all_cores(3))\nimport jax\nprint(jax.device_count())'
                 ).splitlines() == ['3', '3']
  # A count already set (e.g. by a test harness) is kept unless one is asked for explicitly.
  preset = '--xla_force_host_platform_device_count=2'
  assert _python('from flexround_jax import cpu\nprint(cpu.use_all_cores())', preset) == '2'
  assert _python('from flexround_jax import cpu\nprint(cpu.use_all_cores(4))\nimport jax\nprint(jax.device_count())',
                 preset).splitlines() == ['4', '4']


def test_use_all_cores_after_jax_started_is_an_error():
  import jax  # noqa: F401  (this test process has jax already)
  with pytest.raises(RuntimeError, match='before jax is imported'):
    cpu.use_all_cores(5)
  with pytest.raises(ValueError, match='positive integer'):
    cpu.use_all_cores(0)


def test_compile_cache_stores_compiled_programs_for_the_next_process(tmp_path):
  code = ('import jax, jax.numpy as jnp\n'
          'from flexround_jax import compile_cache\n'
          f'compile_cache.enable({str(tmp_path / "cache")!r}, min_compile_seconds=0)\n'
          'print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).sum()))')
  first = _python(code)
  entries = os.listdir(tmp_path / 'cache')
  assert entries
  assert _python(code) == first
  assert sorted(os.listdir(tmp_path / 'cache')) == sorted(entries)   # the second process found them all


@pytest.mark.parametrize('kwargs', [{'path': ''}, {'path': None}, {'path': 'x', 'min_compile_seconds': -1},
                                    {'path': 'x', 'min_compile_seconds': True}])
def test_compile_cache_rejects_bad_arguments(kwargs):
  from flexround_jax import compile_cache
  with pytest.raises(ValueError, match='compile_cache.enable'):
    compile_cache.enable(**kwargs)
