"""The provenance every result JSON carries: commit, machine, peak resident memory."""

import re
import time

import numpy as np
import psutil

from flexround_jax import provenance


def test_git_commit_is_a_hash_or_unknown():
  assert re.fullmatch(r'[0-9a-f]{40}|unknown', provenance.git_commit())


def test_host_info_names_the_machine():
  info = provenance.host_info()
  assert set(info) == {'cpu', 'cpu_count', 'backend', 'devices'}
  assert info['cpu'] and info['devices'] >= 1


def test_peak_rss_sees_an_allocation_inside_the_block_only():
  before = psutil.Process().memory_info().rss / 2**20
  with provenance.PeakRSS(every_s=0.02) as rss:
    block = np.ones(32 * 2**20)   # 256 MB of float64, every page touched
    time.sleep(0.3)
    del block
  assert rss.peak_mb >= before + 200
  with provenance.PeakRSS(every_s=0.02) as quiet:
    time.sleep(0.1)
  assert quiet.peak_mb < rss.peak_mb - 150
