"""The provenance every result JSON carries: commit, machine, peak resident memory."""

import mmap
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
    # An anonymous map of its own, so closing it returns the pages to the OS: a numpy array of this size may be
    # carved from a free chunk of the allocator's heap after a long test session, and freeing it keeps RSS up.
    region = mmap.mmap(-1, 256 * 2**20)
    np.frombuffer(region, np.uint8)[:] = 1   # 256 MB, every page touched
    time.sleep(0.3)
    region.close()
  assert rss.peak_mb >= before + 200
  with provenance.PeakRSS(every_s=0.02) as quiet:
    time.sleep(0.1)
  assert quiet.peak_mb < rss.peak_mb - 150


def test_peak_rss_phases_attribute_samples_to_the_latest_mark():
  with provenance.PeakRSS(every_s=0.02) as rss:
    rss.mark('quiet')
    time.sleep(0.1)
    rss.mark('big')
    region = mmap.mmap(-1, 256 * 2**20)
    np.frombuffer(region, np.uint8)[:] = 1
    time.sleep(0.2)
    region.close()
    rss.mark('after')
    time.sleep(0.1)
  phases = rss.phases_mb
  assert list(phases) == ['start', 'quiet', 'big', 'after']
  assert phases['big'] >= phases['quiet'] + 200 and phases['after'] < phases['big'] - 150
  assert max(phases.values()) == round(rss.peak_mb, 1)
