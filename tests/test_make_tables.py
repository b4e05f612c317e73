"""The docs' result tables are the ones experiments/make_tables.py generates from the committed JSON, and the
per-layer facts their prose states come from experiments/compare_layers.py."""

import glob
import json
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), '..')


def _make_tables():
  spec = importlib.util.spec_from_file_location('make_tables', os.path.join(ROOT, 'experiments', 'make_tables.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_docs_tables_match_committed_results():
  mt = _make_tables()
  pages = {os.path.relpath(p, ROOT): open(p).read() for p in mt.doc_pages()}
  for name, fn in mt.TABLES.items():
    blocks = [(page, m) for page, text in pages.items() for m in mt.block_pattern(name).finditer(text)]
    assert len(blocks) == 1, f'results:{name}: expected one block in docs/*.md, found {[p for p, _ in blocks]}'
    page, block = blocks[0]
    assert (block.group(2) or '').strip() == fn().strip(), \
        f'{page}: table {name!r} is stale: run python experiments/make_tables.py --docs'


def test_docs_figures_exist():
  """The figures make_tables.py draws are the ones the results page shows."""
  mt = _make_tables()
  results_page = open(os.path.join(ROOT, 'docs', 'results.md')).read()
  for name in mt.PLOTS:
    assert os.path.exists(os.path.join(mt.ASSETS, f'{name}_vs_bits.png')), name
    assert f'](assets/{name}_vs_bits.png)' in results_page, name


def test_every_llm_result_has_a_row():
  table = _make_tables().llm_table()
  paths = [p for p in glob.glob(os.path.join(ROOT, 'experiments', 'results', 'llm_per_*.json'))
           if not _make_tables().BUDGET.search(p)]   # runs at another step budget: the peers table
  n_results = sum(not json.load(open(p)).get('activation') for p in paths)   # weight-only rows (W/A: llm_wa)
  assert n_results > 0
  assert sum(line.startswith('| W') for line in table.splitlines()) == n_results   # one row per result


def test_peers_table_has_every_setting_once_and_every_peer_result():
  """Each (setting, budget) of the peers table is one row, and every AutoRound and FlexRound run at a peers setting's
  step budget (``..._it<iters>_b<batch>.json``) is shown in it."""
  mt = _make_tables()
  rows = [line for line in mt.peers_table().splitlines() if line.startswith('| W')]
  assert len(rows) == len(mt.PEER_SETTINGS)
  results = os.path.join(ROOT, 'experiments', 'results')
  runs = sum(os.path.exists(path) for tag, iters, batch in mt.PEER_SETTINGS for path in (
      os.path.join(results, 'peers', f'autoround_{tag}_it{iters}_b{batch}.json'),
      os.path.join(results, f'llm_{tag}_flexround_it{iters}_b{batch}.json')))
  cells = [cell.strip() for line in rows for cell in line.split('|')[3:5]]
  main_rows = sum(cell.endswith('†') for cell in cells)   # FlexRound's main-table run stands in at our budget
  assert sum(cell != 'not run yet' for cell in cells) == runs + main_rows


def test_gemma3_table_has_every_setting_and_method_once():
  """Every setting x method of the Gemma 3 table is a row (a result, or 'not run yet'), and each result is shown."""
  mt = _make_tables()
  rows = [line for line in mt.gemma3_table().splitlines() if line.startswith('| W')]
  assert len(rows) == len(mt.GEMMA3_SETTINGS) * len(mt.GEMMA3_METHODS)
  paths = glob.glob(os.path.join(ROOT, 'experiments', 'results', 'gemma3_per_*.json'))
  assert sum('not run yet' not in line for line in rows) == len(paths)


def test_resumed_llm_runs_show_their_summed_layer_times():
  """A resumed run's own timer misses the layers an earlier process ran; the table sums the per-layer times."""
  mt = _make_tables()
  r = json.load(open(os.path.join(ROOT, 'experiments', 'results', 'llm_per_channel_w3_gptq_flexround.json')))
  assert r['quantize_wall_s'] < 60 < mt._units_seconds(r)   # all 30 layers were checkpointed before the resume
  row = next(l for l in mt.llm_table().splitlines() if l.startswith('| W3 per-channel | gptq+flexround |'))
  assert f'| {mt._units_seconds(r):.0f}\\* |' in row


def _compare_layers(setting, method, baseline):
  """The printout of experiments/compare_layers.py (the results page's per-layer facts come from it)."""
  return subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'compare_layers.py'), setting, method,
                         baseline], capture_output=True, text=True, check=True).stdout


def _results_words():
  """docs/results.md with every run of whitespace one space, so a claim can be found however the text is wrapped."""
  return ' '.join(open(os.path.join(ROOT, 'docs', 'results.md')).read().split())


def test_compare_layers_gives_the_results_per_layer_facts():
  """The per-layer claims of the results page's GPTQ -> FlexRound W4 paragraph come out of compare_layers.py."""
  out = _compare_layers('per_channel_w4', 'gptq_flexround', 'flexround')
  assert 'final/start 0.70-1.00' in out
  assert "ends below flexround: 5 of 30 ['layers_11', 'layers_12', 'layers_13', 'layers_14', 'layers_15']" in out
  assert "kept start: ['layers_11', 'layers_28']" in out
  page = _results_words()
  assert 'in layers 11-15 it ends below FlexRound' in page and 'final / start 0.70-1.00' in page


def test_compare_layers_gives_the_results_w3_g128_facts():
  """The per-layer claims of the results page's GPTQ -> FlexRound W3 g128 sentences come out of compare_layers.py."""
  out = _compare_layers('per_group128_w3', 'gptq_flexround', 'flexround')
  assert 'final/rtn 0.20-0.87 (flexround: 0.17-0.85)' in out and 'final/start 0.57-0.94' in out
  assert "ends below flexround: 1 of 30 ['layers_28']" in out and 'kept start: []' in out
  page = _results_words()
  assert 'final/RTN 0.20-0.87 against 0.17-0.85' in page and '(final/start 0.57-0.94)' in page
  assert 'the one below is layer 28' in page and 'no layer kept the start' in page


def test_a_recorded_resume_adds_the_restored_units_seconds():
  """Runs that record ``resumed_units`` get the earlier processes' time from exactly those units' ``seconds``."""
  mt = _make_tables()
  report = [{'seconds': 100.0}] * 3
  assert mt._resumed_seconds({'quantize_wall_s': 50.0, 'resumed_units': 0, 'report': report}) is None
  assert mt._resumed_seconds({'quantize_wall_s': 500.0, 'resumed_units': 2, 'report': report}) == 200.0
  # Unrecorded (older results): inferred from the per-unit sum, caught only when the sum exceeds the timer.
  assert mt._resumed_seconds({'quantize_wall_s': 120.0, 'report': report}) == 180.0
  assert mt._resumed_seconds({'quantize_wall_s': 500.0, 'report': report}) is None


def test_compare_layers_gives_the_results_gptq_lrq_facts():
  """The per-layer claims of the results page's GPTQ -> LRQ paragraph come out of compare_layers.py."""
  out = _compare_layers('per_channel_w3', 'gptq_lrq', 'lrq')
  assert 'final/rtn 0.31-0.95 (lrq: 0.38-0.99)' in out and 'ends below lrq: 30 of 30' in out
  assert "kept start: ['layers_0', 'layers_28']" in out
  page = _results_words()
  assert 'final/RTN 0.31-0.95 against 0.38-0.99' in page and 'Layers 0 and 28 kept GPTQ\'s start' in page
