"""The docs' result tables (and plots) generated from the committed JSON in experiments/results.

  python experiments/make_tables.py          # print the tables
  python experiments/make_tables.py --docs   # also rewrite the blocks between <!-- results:NAME --> markers in
                                             # docs/*.md (docs/results.md, docs/benchmarks.md) and write
                                             # docs/assets/<name>_vs_bits.png
Only settings with a JSON appear; missing ones are listed as not run yet.
"""

import argparse
import glob
import json
import os
import re

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, 'results')
DOCS = os.path.join(HERE, '..', 'docs')
ASSETS = os.path.join(DOCS, 'assets')   # the figures the docs pages show
METHODS = ('rtn', 'gptq', 'adaround', 'flexround', 'lrq', 'gptq+flexround', 'gptq+lrq')   # row order
IMAGE_METHODS = ('rtn', 'adaround', 'flexround')   # the image table's columns (GPTQ / LRQ quantize Dense only)


BUDGET = re.compile(r'_it(\d+)_b(\d+)\.json$')   # a run at another step budget than its config's: the peers table's


def _load(pattern, activations: bool = False, budgets: bool = False):
  """Result JSONs matching ``pattern``: weight-only runs, or (``activations``) the runs with quantized inputs. Runs
  at another step budget (``..._it<iters>_b<batch>.json``) only with ``budgets``."""
  paths = sorted(p for p in glob.glob(os.path.join(RESULTS, pattern)) if budgets or not BUDGET.search(p))
  rows = [json.load(open(p)) | {'_file': os.path.basename(p)} for p in paths]
  return [r for r in rows if bool(r.get('activation')) == activations]


def minilm_table() -> str:
  fp = json.load(open(os.path.join(RESULTS, 'minilm_fp.json')))
  rows = _load('minilm_per_*.json')
  lines = ['| setting | method | SimLex-999 | WordSim-353 | cosine to FP | quantize wall (s) |',
           '|---|---|---|---|---|---|',
           f"| float | – | {fp['simlex999_spearman']:.3f} | {fp['wordsim353_spearman']:.3f} | 1.000 | – |"]
  key = lambda r: (r['granularity'], -r['bits'], METHODS.index(r['method']))
  for r in sorted(rows, key=key):
    q = r['quantized']
    lines.append(f"| W{r['bits']} {r['granularity'].replace('_', '-')} | {r['method']} | {q['simlex999']:.3f} | "
                 f"{q['wordsim353']:.3f} | {q['mean_cosine']:.4f} | {r['quantize_wall_s']:.0f} |")
  return '\n'.join(lines)


def minilm_wa_table() -> str:
  """MiniLM with per-token 8-bit inputs next to the weight-only rows of the same weight setting."""
  rows = _load('minilm_per_*a8_*.json', activations=True)
  weight_only = {(r['granularity'], r['bits'], r['method']): r for r in _load('minilm_per_*.json')}
  lines = ['| setting | method | SimLex-999 | WordSim-353 | cosine to FP | quantize wall (s) |', '|---|---|---|---|---|---|']
  for r in sorted(rows, key=lambda r: (-r['bits'], METHODS.index(r['method']))):
    for row, label in ((weight_only.get((r['granularity'], r['bits'], r['method'])), f"W{r['bits']}"),
                       (r, f"W{r['bits']}A{r['activation']['bits']}")):
      if row is not None:
        q = row['quantized']
        lines.append(f"| {label} {row['granularity'].replace('_', '-')} | {row['method']} | {q['simlex999']:.3f} | "
                     f"{q['wordsim353']:.3f} | {q['mean_cosine']:.4f} | {row['quantize_wall_s']:.0f} |")
  return '\n'.join(lines) if rows else '(not run yet: experiments/results/minilm_per_*a8_*.json missing)'


def llm_table() -> str:
  fp = json.load(open(os.path.join(RESULTS, 'llm_fp.json')))
  rows = _load('llm_per_*.json')
  lines = ['| setting | method | perplexity | quantize wall (s) | peak RSS (MB) | export (MB) |',
           '|---|---|---|---|---|---|',
           f"| float (Q4_1-dequantized) | – | {fp['ppl']:.2f} | – | {fp.get('peak_rss_mb', float('nan')):.0f} | "
           f"{4 * 134515008 / 2**20:.0f} (f32) |"]
  resumed_rows = 0
  for r in sorted(rows, key=lambda r: (r['granularity'], -r['bits'], METHODS.index(r['method']))):
    setting = f"W{r['bits']} " + ('per-channel' if r['granularity'] == 'per_channel' else f"g{r['group_size']}")
    wall, rss = f"{r['quantize_wall_s']:.0f}", f"{r.get('peak_rss_mb', float('nan')):.0f}"
    resumed_s = _resumed_seconds(r)
    if resumed_s is not None:   # resumed: the last process did not quantize every layer itself
      wall, rss, resumed_rows = f"{r['quantize_wall_s'] + resumed_s:.0f}\\*", f'{rss}\\*', resumed_rows + 1
    lines.append(f"| {setting} | {r['method']} | {r['quantized']['ppl']:.2f} | {wall} | {rss} | "
                 f"{r.get('export_bytes', 0) / 2**20:.0f} |")
  if resumed_rows:
    lines += ['', '\\* Resumed run: the wall time counts the layers that earlier processes ran by their per-layer',
              'times (report `seconds`), and the peak RSS is that of the last process only.']
  return '\n'.join(lines)


def _units_seconds(result) -> float:
  """Sum of the per-unit wall times in a result's report; they survive a resume, the process's own timer does not."""
  return sum(u.get('seconds', 0.0) for u in result.get('report') or [])


def _resumed_seconds(result) -> float | None:
  """Wall time that earlier processes spent on the units a resumed run restored; None when it was not resumed.

  Runs since ``resumed_units`` was recorded say which units they restored: the restored units' ``seconds`` are
  what ``quantize_wall_s`` leaves out. Older results do not say it; for them, a per-unit sum above
  ``quantize_wall_s`` gives a resume away (a process cannot take less time than the units it ran), and the sum then
  replaces the process's time (this misses a run whose last process took longer than all the per-unit times).
  """
  report = result.get('report') or []
  if 'resumed_units' in result:
    n = result['resumed_units']
    return sum(u.get('seconds', 0.0) for u in report[:n]) if n else None
  units_s = _units_seconds(result)
  return units_s - result['quantize_wall_s'] if units_s > result['quantize_wall_s'] else None


def llm_precision_table() -> str:
  """SmolLM2 FlexRound with bfloat16 compute (results/llm_precision/) next to the float32 row of the same setting."""
  fp = json.load(open(os.path.join(RESULTS, 'llm_fp.json')))
  rows = _load(os.path.join('llm_precision', 'llm_per_*.json'))
  if not rows:
    return '(not run yet: experiments/results/llm_precision/llm_per_*.json missing)'
  lines = ['| setting | method | compute | perplexity | × float | quantize wall (s) | fixed cost per layer (s) |',
           '|---|---|---|---|---|---|---|']
  for r in sorted(rows, key=lambda r: (r['granularity'], -r['bits'], r['_file'])):
    setting = f"W{r['bits']} " + ('per-channel' if r['granularity'] == 'per_channel' else f"g{r['group_size']}")
    tag = f"{r['granularity']}{r['group_size'] or ''}_w{r['bits']}"
    base = _load(f"llm_{tag}_{r['method']}.json")
    for row, compute in ((base[0] if base else None, 'float32'), (r, r.get('compute_dtype', 'float32'))):
      if row is not None:
        ppl = row['quantized']['ppl']
        fixed = row.get('fixed_cost') or {}   # median over layers: unit time minus its optimizer steps
        fixed = f"{fixed['median_fixed_s']:.1f} of {fixed['median_unit_s']:.1f}" if fixed else '–'
        lines.append(f"| {setting} | {row['method']} | {compute} | {ppl:.2f} | {ppl / fp['ppl']:.3f} | "
                     f"{row['quantize_wall_s']:.0f} | {fixed} |")
  return '\n'.join(lines)


def llm_iters_table() -> str:
  """W4 per-channel FlexRound perplexity vs iterations per layer (results/llm_iters/ plus the main table's run)."""
  rows = _load(os.path.join('llm_iters', 'llm_per_channel_w4_flexround_it*.json'))
  rows += _load('llm_per_channel_w4_flexround.json')
  rtn = _load('llm_per_channel_w4_rtn.json')
  lines = ['| iterations per layer | perplexity | quantize wall (s) |', '|---|---|---|']
  lines += [f"| 0 (RTN) | {r['quantized']['ppl']:.2f} | {r['quantize_wall_s']:.0f} |" for r in rtn]
  for r in sorted(rows, key=lambda r: r['iters']):
    lines.append(f"| {r['iters']} | {r['quantized']['ppl']:.2f} | {r['quantize_wall_s']:.0f} |")
  return '\n'.join(lines)


def image_table() -> str:
  rows = _load('image_*_s*.json')
  fp = {}
  for r in rows:
    fp.setdefault(r['model'], r['fp'].get('top1'))
  groups = {}
  for r in rows:
    groups.setdefault((r['model'], r['granularity'], r['bits'], r['method']), []).append(r['quantized']['top1'])
  lines = ['| model | weights | FP | RTN | AdaRound | FlexRound |', '|---|---|---|---|---|---|']
  for model in ('resnet', 'mobilenetv2'):
    for gran in ('per_tensor', 'per_channel'):
      for bits in (4, 3, 2):
        cells = []
        for m in IMAGE_METHODS:
          v = groups.get((model, gran, bits, m))
          cells.append('–' if not v else (f'{v[0]:.2f}' if len(v) == 1 else f'{np.mean(v):.2f} ± {np.std(v):.2f} '
                                                                         f'(n={len(v)})'))
        if any(c != '–' for c in cells):
          lines.append(f"| {model} | W{bits} {gran.replace('_', '-')} | {fp.get(model, float('nan')):.2f} | "
                       + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def image_wa_table() -> str:
  """W/A rows (QDrop setting, per-channel weights) next to the float and weight-only per-channel rows."""
  rows = _load('image_*_s*.json', activations=True)
  weight_only = {}
  for r in _load('image_*_per_channel_*_s*.json'):
    weight_only.setdefault((r['model'], r['bits'], r['method']), []).append(r['quantized']['top1'])
  groups, fp = {}, {}
  for r in rows:
    fp.setdefault(r['model'], r['fp'].get('top1'))
    groups.setdefault((r['model'], r['bits'], r['activation']['bits'], r['method']), []).append(r['quantized']['top1'])

  def cell(v):
    return '–' if not v else (f'{v[0]:.2f}' if len(v) == 1 else f'{np.mean(v):.2f} ± {np.std(v):.2f} (n={len(v)})')
  if not rows:
    return '(not run yet: experiments/results/image_*_w*a*_*.json missing)'
  lines = ['| model | setting | FP | RTN | AdaRound | FlexRound |', '|---|---|---|---|---|---|']
  for model in ('resnet', 'mobilenetv2'):
    for bits, abits in ((4, 4), (2, 4)):
      if not any((model, bits, abits, m) in groups for m in IMAGE_METHODS):
        continue
      lines.append(f"| {model} | W{bits} (weights only) | {fp.get(model, float('nan')):.2f} | "
                   + ' | '.join(cell(weight_only.get((model, bits, m))) for m in IMAGE_METHODS) + ' |')
      lines.append(f"| {model} | W{bits}A{abits} | {fp.get(model, float('nan')):.2f} | "
                   + ' | '.join(cell(groups.get((model, bits, abits, m))) for m in IMAGE_METHODS) + ' |')
  return '\n'.join(lines)


def llm_wa_table() -> str:
  """SmolLM2 W4A8 (per-token 8-bit inputs) next to the W4 weight-only rows of the same weights."""
  fp = json.load(open(os.path.join(RESULTS, 'llm_fp.json')))
  rows = {r['_file'][len('llm_per_channel_w4a8_'):-len('.json')]: r
          for r in _load('llm_per_channel_w4a8_*.json', activations=True)}
  weight_only = {r['method']: r for r in _load('llm_per_channel_w4_*.json')}
  if not rows:
    return '(not run yet: experiments/results/llm_per_channel_w4a8_*.json missing)'
  lines = ['| weights | W4 (A16) perplexity | W4A8 perplexity |', '|---|---|---|',
           f"| float | {fp['ppl']:.2f} | {rows['float']['quantized']['ppl']:.2f} (W16A8) |" if 'float' in rows else
           f"| float | {fp['ppl']:.2f} | – |"]
  order = lambda name: METHODS.index(name.removesuffix('_trained')) if name.removesuffix('_trained') in METHODS else 99
  for name, r in sorted(rows.items(), key=lambda kv: (kv[0].endswith('_trained'), order(kv[0]), kv[0])):
    if name == 'float':
      continue
    base = name.removesuffix('_trained')
    how = ' (reconstructed with A8 inputs)' if name.endswith('_trained') else ''
    # The A16 perplexity of the very weights (recorded by their run), else the table's row of the same method.
    w4 = r.get('weight_only') or (weight_only[base]['quantized'] if base in weight_only and not how else None)
    lines.append(f"| {base}{how} | {w4['ppl']:.2f} | {r['quantized']['ppl']:.2f} |" if w4
                 else f"| {base}{how} | – | {r['quantized']['ppl']:.2f} |")
  return '\n'.join(lines)


def _block_loss_ratio(r) -> float:
  """Mean of (final reconstruction loss / RTN loss) over the units at the run's bit width (not the 8-bit ones)."""
  return float(np.mean([u['loss_final'] / u['loss_rtn'] for u in r['report']
                        if u['loss_rtn'] > 0 and set(u['bits']) == {r['bits']}]))


def _block_loss(r) -> float:
  """Mean final reconstruction loss over the units at the run's bit width."""
  return float(np.mean([u['loss_final'] for u in r['report'] if set(u['bits']) == {r['bits']}]))


def image_iters_table() -> str:
  """ResNet per-tensor W3 test top-1 vs iterations per block, seed 0 (results/iters/; 2000 = the table's run)."""
  rows = _load(os.path.join('iters', 'image_*_it*.json'))
  rows += [r for r in _load('image_resnet_per_tensor_w3_*_s0.json') if r['method'] != 'rtn']
  by_iters = {}
  for r in rows:
    by_iters.setdefault(r['iters'], {})[r['method']] = r
  lines = ['| iterations per block | AdaRound top-1 | FlexRound top-1 | AdaRound loss / RTN | FlexRound loss / RTN | '
           'FlexRound wall (s) |', '|---|---|---|---|---|---|']
  for it in sorted(by_iters):
    a, f = by_iters[it].get('adaround'), by_iters[it].get('flexround')
    cells = ['–' if r is None else f"{r['quantized']['top1']:.2f}" for r in (a, f)]
    cells += ['–' if r is None else f'{_block_loss_ratio(r):.3f}' for r in (a, f)]
    cells.append('–' if f is None else f"{f['quantize_wall_s']:.0f}")
    lines.append(f'| {it} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def image_ablate_table() -> str:
  """FlexRound knobs one at a time (results/ablate/), validation top-1, seed 0."""
  rows = _load(os.path.join('ablate', 'image_*.json'))
  lines = ['| setting | variant | validation top-1 | mean block loss | mean block loss / RTN | quantize wall (s) |',
           '|---|---|---|---|---|---|']
  for r in sorted(rows, key=lambda r: r['_file']):
    setting = f"{r['model']} W{r['bits']} {r['granularity'].replace('_', '-')}"
    variant = r['_file'].removeprefix(f"image_{r['model']}_{r['granularity']}_w{r['bits']}_").removesuffix('.json')
    lines.append(f"| {setting} | {variant} | {r['quantized']['top1']:.2f} | {_block_loss(r):.4f} | "
                 f"{_block_loss_ratio(r):.3f} | "
                 f"{r['quantize_wall_s']:.0f} |")
  return '\n'.join(lines)


PEER_SETTINGS = (('per_channel_w4', 200, 8), ('per_channel_w4', 250, 2), ('per_group128_w4', 200, 8),
                 ('per_group128_w3', 200, 8), ('per_group128_w3', 250, 2))   # (setting, steps, batch) per layer
OUR_BUDGET = (250, 2)   # configs/smollm2.py: the budget of the main SmolLM2 table's rows


def _window_nll_of(path: str):
  """The per-window mean NLL stored next to a result JSON (``<name>.window_nll.txt``), or None."""
  nll = path[:-len('.json')] + '.window_nll.txt'
  return np.loadtxt(nll, np.float64) if os.path.exists(nll) else None


def peers_table() -> str:
  """SmolLM2: AutoRound (experiments/results/peers/) against FlexRound at the same setting and step budget, with the
  paired difference of their per-window mean NLL where both rows stored it."""
  lines = ['| setting | steps × batch per layer | AutoRound | FlexRound | FlexRound − AutoRound (mean NLL ± paired SE) | '
           'quantize wall (s), AutoRound / FlexRound | peak RSS (MB), AutoRound / FlexRound |',
           '|---|---|---|---|---|---|---|']
  main_row = False
  for tag, iters, batch in PEER_SETTINGS:
    ar_path = os.path.join(RESULTS, 'peers', f'autoround_{tag}_it{iters}_b{batch}.json')
    fr_path = os.path.join(RESULTS, f'llm_{tag}_flexround_it{iters}_b{batch}.json')
    fr_mark = ''
    if not os.path.exists(fr_path) and (iters, batch) == OUR_BUDGET:   # the main table's run: no per-window NLL
      fr_path, fr_mark = os.path.join(RESULTS, f'llm_{tag}_flexround.json'), '†'
    ar = json.load(open(ar_path)) if os.path.exists(ar_path) else None
    fr = json.load(open(fr_path)) if os.path.exists(fr_path) else None
    main_row |= bool(fr and fr_mark)
    bits, group = re.fullmatch(r'per_(channel|group(\d+))_w(\d)', tag).group(3, 2)
    setting = f'W{bits} ' + (f'g{group}' if group else 'per-channel')
    cell = lambda r, ppl: 'not run yet' if r is None else f'{ppl(r):.2f}'
    pair = _paired(_window_nll_of(fr_path) if fr else None, _window_nll_of(ar_path) if ar else None)
    wall = ' / '.join('–' if r is None else f"{r['quantize_wall_s']:.0f}" for r in (ar, fr))
    rss = ' / '.join('–' if r is None else f"{r.get('peak_rss_mb', float('nan')):.0f}" for r in (ar, fr))
    lines.append(f"| {setting} | {iters} × {batch} | {cell(ar, lambda r: r['ppl'])} | "
                 f"{cell(fr, lambda r: r['quantized']['ppl'])}{fr_mark if fr else ''} | {pair} | {wall} | {rss} |")
  if main_row:
    lines += ['', '† The main SmolLM2 table\'s row (same budget): its quantized model was not kept, so it has no '
              'per-window NLL to pair.']
  return '\n'.join(lines)


GGUF_ROWS = {   # row -> (what the file is, who made it)
    'source_q4_1': ('source file (Q4_1, group 32, asymmetric; our float baseline)', 'SmolLM2 release'),
    'llamacpp_q4_0': ('Q4_0 from the source', 'llama.cpp `llama-quantize`'),
    'llamacpp_imatrix_q4_0': ('Q4_0 from the source, importance matrix', 'llama.cpp `llama-imatrix` + `llama-quantize`'),
    'llamacpp_q4_k_m': ('Q4_K_M from the source', 'llama.cpp `llama-quantize`'),
    'llamacpp_imatrix_q4_k_m': ('Q4_K_M from the source, importance matrix',
                                'llama.cpp `llama-imatrix` + `llama-quantize`'),
    'rtn_q4_0': ('Q4_0, RTN', 'flexround_jax `save_gguf`'),
    'flexround_q4_0': ('Q4_0, FlexRound', 'flexround_jax `save_gguf`'),
    'llamacpp_q8_0': ('Q8_0 from the source', 'llama.cpp `llama-quantize`'),
    'rtn_q8_0': ('Q8_0, RTN (narrow range, codes ±127)', 'flexround_jax `save_gguf`'),
}
GEMMA3_GGUF_ROWS = {
    'gemma3_source_q4_k_m': ('source file (Q4_K_M: Q5_0 / Q4_K / Q6_K / Q8_0 layers, Q8_0 embedding; our float '
                             'baseline)', 'Gemma 3 release'),
    'gemma3_llamacpp_q4_0': ('Q4_0 from the float32 source', 'llama.cpp `llama-quantize`'),
    'gemma3_llamacpp_imatrix_q4_0': ('Q4_0 from the float32 source, importance matrix',
                                     'llama.cpp `llama-imatrix` + `llama-quantize`'),
    'gemma3_llamacpp_q4_k_m': ('Q4_K_M from the float32 source', 'llama.cpp `llama-quantize`'),
    'gemma3_llamacpp_imatrix_q4_k_m': ('Q4_K_M from the float32 source, importance matrix',
                                       'llama.cpp `llama-imatrix` + `llama-quantize`'),
}
GGUF_BASE = 'llamacpp_q4_0'   # the row the paired differences are taken against
GGUF_OURS = 'flexround_q4_0'  # ... and our FlexRound file, where it has per-chunk NLL on the same chunks
GGUF_PREFIX = 40              # the chunks every row has been scored on (the first rows were scored on 40)


def _gguf_chunk_nll(row: str):
  """The per-chunk mean NLL gguf_ppl.py stores next to a row's JSON, or None."""
  path = os.path.join(RESULTS, f'gguf_{row}.chunk_nll.txt')
  return np.loadtxt(path, np.float64) if os.path.exists(path) else None


def _paired(nll, base) -> str:
  """'mean NLL(nll) - mean NLL(base) ± paired SE' over the chunks both rows have (their common prefix, named when
  one row has more), or '–'."""
  from flexround_jax.evals.perplexity import paired_nll_difference  # pylint: disable=g-import-not-at-top
  if nll is None or base is None:
    return '–'
  n = min(len(nll), len(base))
  d = paired_nll_difference(base[:n], nll[:n])
  return f"{d['diff']:+.4f} ± {d['se']:.4f}" + ('' if len(nll) == len(base) else f' (first {n})')


def _gguf_rows(names: dict, versus: dict, jax_columns: bool) -> list[str]:
  """Rows of a GGUF table: file, maker, size, chunks, llama.cpp perplexity on all of them and on the first 40, the
  paired mean-NLL difference to each row of ``versus`` ({column title: row}), our JAX model on the same file."""
  rows = {r['row']: r for r in _load('gguf_*.json')}
  bases = {title: _gguf_chunk_nll(row) for title, row in versus.items()}
  head = (['GGUF file', 'made by', 'size (MB)', 'chunks', 'llama.cpp `llama-perplexity` (2nd half of each chunk)',
           f'same, first {GGUF_PREFIX} chunks'] + [f'mean NLL − {title} ± paired SE' for title in versus] +
          (['JAX, same file, same scoring', 'JAX, same file, every token'] if jax_columns else []))
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, (what, who) in names.items():
    if name not in rows:
      lines.append(f'| {what} | {who} | not run yet |' + ' |' * (len(head) - 3))
      continue
    r, nll = rows[name], _gguf_chunk_nll(name)
    ppl = r['llama_cpp']
    if nll is not None:
      prefix = f'{np.exp(nll[:GGUF_PREFIX].mean()):.2f}'
    else:
      prefix = f"{ppl['ppl']:.2f}" if ppl['n_chunks'] == GGUF_PREFIX else '–'
    cells = [what, who, f"{r['file_bytes'] / 2**20:.0f}", str(ppl['n_chunks']),
             f"{ppl['ppl']:.2f} ± {ppl['ppl_stderr']:.2f}", prefix]
    cells += ['–' if name == versus[title] else _paired(nll, base) for title, base in bases.items()]
    if jax_columns:
      jax = r.get('jax_same_file')
      if jax:
        windows = '' if jax['n_windows'] == ppl['n_chunks'] else f" ({jax['n_windows']} windows)"
        cells += [f"{jax['ppl_second_half']:.2f}{windows}", f"{jax['ppl_protocol']:.2f}{windows}"]
      else:
        cells += ['–', '–']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return lines


def gguf_table() -> str:
  """SmolLM2, one row per GGUF file: perplexity by llama.cpp on all its chunks and on the first 40 (the chunks every
  row has), the paired mean-NLL differences to llama.cpp's Q4_0 and to our FlexRound Q4_0, and our JAX model's
  perplexity of the same file."""
  return '\n'.join(_gguf_rows(GGUF_ROWS, {'Q4_0 `llama-quantize`': GGUF_BASE, 'Q4_0 FlexRound': GGUF_OURS},
                               jax_columns=True))


def gguf_gemma3_table() -> str:
  """Gemma 3 270M, one row per GGUF file, scored by llama.cpp (all 345 chunks), with the paired mean-NLL difference
  to llama.cpp's Q4_0."""
  return '\n'.join(_gguf_rows(GEMMA3_GGUF_ROWS, {'Q4_0 `llama-quantize`': 'gemma3_' + GGUF_BASE}, jax_columns=False))


GEMMA3_SETTINGS = (('per_channel', 4, None), ('per_group', 3, 128), ('per_group', 4, 128))   # llm_ptq's run order
GEMMA3_METHODS = ('rtn', 'gptq', 'adaround', 'flexround', 'lrq')


def _chunk_nll(result):
  """The per-chunk mean NLL stored next to a result JSON (its ``quantized.chunk_nll_file``), or None."""
  name = (result.get('quantized') or {}).get('chunk_nll_file')
  path = os.path.join(RESULTS, name) if name else None
  return np.loadtxt(path, np.float64) if path and os.path.exists(path) else None


def gemma3_table() -> str:
  """Gemma 3 270M: every setting x method of experiments/llm_ptq.py --model gemma3 (missing ones: not run yet), with
  the paired mean-NLL difference to FlexRound of the same setting over llama.cpp's chunks."""
  from flexround_jax.evals.perplexity import paired_nll_difference  # pylint: disable=g-import-not-at-top
  fp = json.load(open(os.path.join(RESULTS, 'gemma3_fp.json')))
  rows = {(r['granularity'], r['bits'], r['group_size'], r['method']): r for r in _load('gemma3_per_*.json')}
  lines = ['| setting | method | perplexity (llama.cpp scoring) | mean NLL − FlexRound ± paired SE | quantize wall (s) '
           '| run wall (s) | peak RSS (MB) | export (MB) |', '|---|---|---|---|---|---|---|---|',
           f"| float (Q4_K_M-dequantized) | – | {fp['ppl_second_half']:.2f} | – | – | – | "
           f"{fp['peak_rss_mb']:.0f} | {4 * 268098176 / 2**20:.0f} (f32) |"]
  for granularity, bits, group in GEMMA3_SETTINGS:
    setting = f'W{bits} ' + ('per-channel' if granularity == 'per_channel' else f'g{group}')
    flex = rows.get((granularity, bits, group, 'flexround'))
    flex_nll = _chunk_nll(flex) if flex else None
    for method in GEMMA3_METHODS:
      r = rows.get((granularity, bits, group, method))
      if r is None:
        lines.append(f'| {setting} | {method} | not run yet | | | | | |')
        continue
      nll, diff = _chunk_nll(r), '–'
      if method != 'flexround' and nll is not None and flex_nll is not None and len(nll) == len(flex_nll):
        d = paired_nll_difference(flex_nll, nll)
        diff = f"{d['diff']:+.4f} ± {d['se']:.4f}"
      wall, rss = f"{r['quantize_wall_s']:.0f}", f"{r.get('peak_rss_process_mb', r['peak_rss_mb']):.0f}"
      if _resumed_seconds(r) is not None:
        wall, rss = f"{r['quantize_wall_s'] + _resumed_seconds(r):.0f}\\*", f'{rss}\\*'
      windows = '' if r['quantized']['n_windows'] == fp['n_windows'] else f" ({r['quantized']['n_windows']} chunks)"
      lines.append(f"| {setting} | {method} | {r['quantized']['ppl']:.2f}{windows} | {diff} | {wall} | "
                   f"{r.get('script_wall_s', r['total_wall_s']):.0f} | {rss} | {r['export_bytes'] / 2**20:.0f} |")
  return '\n'.join(lines)


BENCH = os.path.join(HERE, '..', 'benchmarks', 'results')
BENCH_BLOCKS = {'resnet_basic_block_64x32x32_b32': 'ResNet basic block, 64 ch, 32×32',
                'transformer_512_seq128_b8': 'transformer layer, width 512, seq 128',
                'smollm2_layer_576_seq512': 'SmolLM2 decoder layer, seq 512'}


def bench_table() -> str:
  """benchmarks/results/engine_cpu.json (and torch_step_cpu.json): the training step per block, with the in-process
  baselines, against the same-process matmul peak."""
  bench = json.load(open(os.path.join(BENCH, 'engine_cpu.json')))
  peak = bench['matmul_2048_f32_gflops']
  lines = [f"Host: {bench['machine']['cpu']}, {bench['machine']['cpu_count']} cores, jax {bench['machine']['jax']}; "
           f'float32 matmul peak {peak:.0f} GFLOP/s in the same process.', '',
           '| block | grid | batch | devices | steps per dispatch | step | forward | GFLOP/step | GFLOP/s | '
           'of matmul peak |', '|---|---|---|---|---|---|---|---|---|---|']
  for r in bench['rows']:
    name = next(v for k, v in BENCH_BLOCKS.items() if r['block'].startswith(k))
    if r.get('baseline'):
      name += f" ({r['baseline']}: the previous engine)"
    lines.append(f"| {name} | {r['granularity'].replace('_', '-')} | {r['batch']} | {r['devices']} | "
                 f"{r['steps_per_dispatch']} | {r['step_ms']:.0f} ms | {r['forward_ms']:.0f} ms | "
                 f"{r['gflop_per_step']:.1f} | {r['gflops']:.0f} | {100 * r['fraction_of_matmul_peak']:.0f} % |")
  torch_path = os.path.join(BENCH, 'torch_step_cpu.json')
  if os.path.exists(torch_path):
    t = json.load(open(torch_path))
    lines.append(f"| SmolLM2 decoder layer, official PyTorch FlexRound loop ({t['framework']}, "
                 f"{t['threads']} threads) | per-channel | {t['block'].rsplit('_b', 1)[1]} | - | 1 | "
                 f"{t['step_ms']:.0f} ms | | | | |")
    ours = next(r for r in bench['rows'] if r['block'].startswith('smollm2') and not r.get('baseline')
                and r['granularity'] == 'per_channel' and r['batch'] == 2 and r['devices'] == 1)
    floor_ms = 1e3 * ours['gflop_per_step'] / peak
    need = ours['gflop_per_step'] / (t['step_ms'] / 2e3)   # GFLOP/s for half the PyTorch step
    lines += ['', f"Floor of our SmolLM2 step on this host: its {ours['gflop_per_step']:.1f} GFLOP at the same-process "
                  f"matmul peak take {floor_ms:.0f} ms, {t['step_ms'] / floor_ms:.2f}x faster than the PyTorch loop's "
                  f"{t['step_ms']:.0f} ms; 2x that loop ({t['step_ms'] / 2:.0f} ms) would need {need:.0f} GFLOP/s, "
                  f"{100 * need / peak:.0f} % of that peak."]
  return '\n'.join(lines)


def stream_table() -> str:
  """benchmarks/results/stream_7b_cpu.json: a 7B-shaped Llama quantized from a memory-mapped file, per phase."""
  b = json.load(open(os.path.join(BENCH, 'stream_7b_cpu.json')))
  m, layer = b['model'], b['layer']
  gib = lambda mb: f'{mb / 1024:.1f} GiB'
  lines = [f"Host: {b['host']['cpu']}, {b['host']['cpu_count']} cores; model: {m['n_layers']} layers, width "
           f"{m['dim']}, SwiGLU {m['ffn_dim']}, vocab {m['vocab_size']}, {m['dtype']} "
           f"({b['file_bytes'] / 2**30:.1f} GiB file); calibration {b['calibration']}, batch {b['batch_size']}.", '',
           '| phase | wall | peak RSS | peak anonymous memory (what RAM must hold) |', '|---|---|---|---|']
  names = {'build': 'write the file, one tensor at a time', 'dry': 'dry run (plan of 32 units)',
           'dry_before_planning_changes': 'dry run, before the planning changes below',
           'layer': f"quantize layers_0 (FlexRound W4, {b['iters']} steps, spill_dir)",
           'layer_fused_grad': f"the same with `flexround(fused_grad=True)`"}
  for phase in ('build', 'dry_before_planning_changes', 'dry', 'layer', 'layer_fused_grad'):
    if phase in b:
      r = b[phase]
      lines.append(f"| {names[phase]} | {r['wall_s']:.0f} s | {gib(r['peak_rss_mb'])} | {gib(r['peak_anon_mb'])} |")
  lines += ['', f"Training state of one layer per device: planned {layer['peak_state_bytes_planned'] / 2**30:.2f} GiB "
                f"(dry run, abstract), measured {layer['state_bytes_per_device'] / 2**30:.2f} GiB (report)."]
  if 'step' in b:
    st = b['step']
    lines[-1] += (f" Its compiled training step ({st['steps_per_dispatch']} steps per dispatch; XLA's memory "
                  f"analysis): arguments {st['step_argument_bytes'] / 2**30:.2f} GiB (state and minibatches), "
                  f"temporaries "
                  f"{st['step_temp_bytes'] / 2**30:.2f} GiB.")
  if 'step_fused_grad' in b:
    lines[-1] += (f" With `fused_grad=True` (closed-form gradient) the temporaries are "
                  f"{b['step_fused_grad']['step_temp_bytes'] / 2**30:.2f} GiB.")
  if 'checks' in b:
    c = b['checks']
    lines += ['', f"Planning's value checks of all {c['elements'] / 1e9:.1f} B weights of the memory map (every leaf "
                  f"finite? each kernel's max |w|?): {c['numpy_s']:.1f} s with numpy's isfinite, max and min on the "
                  f"bfloat16 arrays (the engine's host path before), {c['bits_again_s']:.1f} s with the engine's "
                  f"integer max over the bits, both from pages in memory ({c['numpy_s'] / c['bits_again_s']:.0f}x); "
                  f"{c['bits_s']:.1f} s for the bits path's first pass, which read the file from disk."]
  return '\n'.join(lines)


def stream_hf_table() -> str:
  """benchmarks/results/stream_7b_hf_cpu.json: the 7B shape as a Hugging Face folder of bfloat16 shards, loaded with
  ``load_hf(stream=True)``, per phase, against issue 33's 8 GB peak RSS."""
  b = json.load(open(os.path.join(BENCH, 'stream_7b_hf_cpu.json')))
  m, h = b['model'], b['host']
  gb = lambda n: f'{n / 1e9:.2f} GB'
  lines = [f"Host: {h['cpu_model']}, {h['cpu_count']} cores ({', '.join(h['cpu_flags']) or 'no bf16 flags'}); model: "
           f"{m['architectures'][0]}, {m['num_hidden_layers']} layers, width {m['hidden_size']}, SwiGLU "
           f"{m['intermediate_size']}, vocab {m['vocab_size']}, {'tied' if m['tie_word_embeddings'] else 'untied'} embeddings, "
           f"{b['layout']} "
           f"({b['bytes_on_disk'] / 1e9:.1f} GB); calibration {b['calibration']}, batch {b['batch_size']}; "
           f"{b['scheme']}, {b['iters']} steps, spill_dir.", '',
           '| phase | wall | peak RSS (VmHWM) | peak anonymous memory (sampled) | under 8 GB |', '|---|---|---|---|---|']
  names = {'build': 'write the folder, one tensor at a time',
           'dry': '`load_hf(DIR, stream=True)` and dry run (plan of 32 units)',
           'layer_before_engine_release': 'quantize layers_0, before the engine dropped mapped pages',
           'layer': 'quantize layers_0', 'layer_fused_grad': 'quantize layers_0 with `flexround(fused_grad=True)`'}
  for phase, name in names.items():
    if phase in b:
      r = b[phase]
      lines.append(f"| {name} | {r['wall_s']:.0f} s | {gb(r['peak_rss_bytes'])} | "
                   f"{gb(r['peak_anon_mb_sampled'] * 2**20)} | {'yes' if r['under_8gb'] else '**no**'} |")
  layers = [(n, b[n]) for n in ('layer', 'layer_fused_grad', 'layer_before_engine_release') if n in b]
  if layers:
    r = layers[0][1]
    lines += ['', f"Training state of one layer per device: planned {r['peak_state_bytes_planned'] / 2**30:.2f} GiB "
                  f"(dry run), measured {r['state_bytes_per_device'] / 2**30:.2f} GiB (report); block loss of "
                  f"layers_0: RTN {r['loss_rtn']:.1f}, after FlexRound " +
                  ', '.join(f"{x['loss_final']:.1f} ({names[n].replace('quantize layers_0', '').strip(', ') or 'default'})"
                            for n, x in layers) + '.']
  return '\n'.join(lines)


TABLES = {'minilm': minilm_table, 'llm': llm_table, 'llm_iters': llm_iters_table, 'llm_precision': llm_precision_table,
          'image': image_table,
          'image_iters': image_iters_table, 'image_ablate': image_ablate_table, 'gguf': gguf_table,
          'gguf_gemma3': gguf_gemma3_table,
          'bench': bench_table, 'image_wa': image_wa_table, 'minilm_wa': minilm_wa_table, 'llm_wa': llm_wa_table,
          'stream': stream_table, 'stream_hf': stream_hf_table, 'gemma3': gemma3_table, 'peers': peers_table}
PLOTS = {   # docs/assets/<name>_vs_bits.png: (results pattern, metric, lines by, lower is better (and a log axis))
    'minilm': ('minilm_per_*.json', 'quantized.mean_cosine', 'granularity+method', False),
    'llm': ('llm_per_*.json', 'quantized.ppl', 'granularity+method', True),
    'image': ('image_*_s*.json', 'quantized.top1', 'model+granularity+method', False)}


def make_plots() -> list[str]:
  """Metric vs bits, one line per setting and method (mean ± std over seeds); returns the PNGs written."""
  from flexround_jax import plots  # pylint: disable=g-import-not-at-top
  written = []
  for name, (pattern, metric, group, lower) in PLOTS.items():
    rows = _load(pattern)
    if rows:
      path = os.path.join(ASSETS, f'{name}_vs_bits.png')
      plots.metric_vs_bits(rows, metric, path, title=f'{name}: {metric} vs weight bits', group=group,
                           higher_is_better=not lower, log_y=lower)
      written.append(path)
  return written


def doc_pages() -> list[str]:
  """The docs pages that may hold result blocks."""
  return sorted(glob.glob(os.path.join(DOCS, '*.md')))


def block_pattern(name: str) -> re.Pattern:
  """The block between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` (group 2: the table)."""
  return re.compile(rf'(<!-- results:{name} -->\n)(.*?\n)?(<!-- /results:{name} -->)', re.S)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--docs', action='store_true', help='rewrite the result blocks in docs/*.md and the figures')
  args = parser.parse_args()
  pages = {path: open(path).read() for path in doc_pages()}
  for name, fn in TABLES.items():
    try:
      table = fn()
    except FileNotFoundError as e:
      table = f'(not run yet: {os.path.basename(e.filename)} missing)'
    print(f'## {name}\n{table}\n')
    pattern = block_pattern(name)
    holders = [path for path, text in pages.items() if pattern.search(text)]
    if args.docs and len(holders) != 1:
      raise SystemExit(f'results:{name}: expected one docs page with this block, found {len(holders)}: {holders}')
    for path in holders:
      pages[path] = pattern.sub(lambda m: m.group(1) + table + '\n' + m.group(3), pages[path])
  if args.docs:
    for path, text in pages.items():
      if text != open(path).read():
        open(path, 'w').write(text)
        print(f'wrote {os.path.relpath(path)}')
    for path in make_plots():
      print(f'wrote {os.path.relpath(path)}')


if __name__ == '__main__':
  main()
