"""Figures from a QuantizeResult or results JSON (matplotlib, the ``plots`` extra). Each function saves a PNG when
given a path and returns the Figure, so notebooks show it inline and the runner writes it to the workdir.

Importing this module imports no matplotlib and selects no backend: pyplot loads on the first figure with whatever
backend the session has (inline in notebooks; Agg where there is no display), and PNGs are drawn by Agg either way.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from flexround_jax import _extras, _layout, treepath


def _pyplot():
  return _extras.require('matplotlib.pyplot', 'plots', 'flexround_jax.plots draws with matplotlib')


def __getattr__(name):
  if name == 'plt':   # ``plots.plt.close('all')``: pyplot, imported on first use
    return _pyplot()
  raise AttributeError(f'module flexround_jax.plots has no attribute {name!r}')


def _report(result_or_report) -> list[dict]:
  return list(getattr(result_or_report, 'report', result_or_report))


def _save(fig, path):
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=120)
  return fig


def block_losses(result_or_report, path: str | None = None, title: str = ''):
  """Per-unit reconstruction loss: at the RTN start vs after training (log scale)."""
  rep = _report(result_or_report)
  names = [r['unit'] for r in rep]
  x = np.arange(len(rep))
  fig, ax = _pyplot().subplots(figsize=(max(6, 0.45 * len(rep) + 2), 4))
  ax.bar(x - 0.2, [r['loss_rtn'] for r in rep], 0.4, label='RTN (start)', color='#bbbbbb')
  ax.bar(x + 0.2, [r['loss_final'] for r in rep], 0.4, label='after reconstruction', color='#1f77b4')
  ax.set_xticks(x, names, rotation=60, ha='right', fontsize=8)
  ax.set_yscale('log')
  ax.set_ylabel('block output loss (sum over features, mean)')
  ax.set_title(title or 'Per-block reconstruction loss')
  ax.legend()
  return _save(fig, path)


def loss_curves(result_or_report, path: str | None = None, title: str = ''):
  """Training loss against step for every unit (relative to its RTN start)."""
  rep = _report(result_or_report)
  fig, ax = _pyplot().subplots(figsize=(7, 4))
  for r in rep:
    curve = np.asarray(r.get('loss_curve') or [], float)
    if curve.size and r['loss_rtn'] > 0:
      ax.plot(curve[:, 0], curve[:, 1] / r['loss_rtn'], label=r['unit'], lw=1)
  ax.axhline(1.0, color='k', ls=':', lw=0.8)
  ax.set_xlabel('step')
  ax.set_ylabel('training loss / RTN loss')
  ax.set_yscale('log')
  ax.set_title(title or 'Reconstruction loss curves')
  if len(rep) <= 12:
    ax.legend(fontsize=7)
  return _save(fig, path)


def metric_vs_bits(rows: Iterable[Mapping[str, Any]], metric: str, path: str | None = None, title: str = '',
                   group: str = 'method', higher_is_better: bool = True, log_y: bool = False):
  """One line per ``group`` (e.g. method or model/method): mean ± std of ``metric`` over seeds against bits.

  ``log_y``: logarithmic metric axis (perplexities that span 20 to 450 in one figure).

  ``rows``: results dicts with 'bits', the ``group`` key(s) ('+'-joined for several) and ``metric`` (dotted path,
  e.g. 'quantized.top1').
  """
  def get(row, dotted):
    for part in dotted.split('.'):
      row = row[part]
    return row

  lines: dict[str, dict[int, list[float]]] = {}
  for row in rows:
    key = ' / '.join(str(row[g]) for g in group.split('+'))
    lines.setdefault(key, {}).setdefault(int(row['bits']), []).append(float(get(row, metric)))
  # Colour by the last group key (the method), line style and marker by the rest (e.g. the granularity): the same
  # method has the same colour in every setting, and no two lines share colour and style (matplotlib's default
  # cycle repeats its 10 colours from the 11th line on).
  split = {key: key.rsplit(' / ', 1) if ' / ' in key else ('', key) for key in lines}
  last = sorted({v[1] for v in split.values()})
  rest = sorted({v[0] for v in split.values()})
  cmap = _pyplot().get_cmap('tab10' if len(last) <= 10 else 'tab20')
  linestyles, markers = ('-', '--', ':', '-.'), ('o', 's', '^', 'D', 'v', 'P')
  fig, ax = _pyplot().subplots(figsize=(6, 4))
  for key, by_bits in sorted(lines.items()):
    bits = sorted(by_bits)
    mean = [np.mean(by_bits[b]) for b in bits]
    std = [np.std(by_bits[b]) for b in bits]
    i = rest.index(split[key][0])
    ax.errorbar(bits, mean, yerr=std, color=cmap(last.index(split[key][1]) % cmap.N), linestyle=linestyles[i % 4],
                marker=markers[i % 6], capsize=3, label=key)
  ax.set_xlabel('weight bits')
  ax.set_ylabel(metric + ('' if higher_is_better else ' (lower is better)'))
  ax.set_xticks(sorted({b for v in lines.values() for b in v}))
  if log_y:
    ax.set_yscale('log')
  ax.set_title(title or f'{metric} vs bits')
  ax.legend(fontsize=8)
  return _save(fig, path)


def flexround_scales(states: Mapping[str, Mapping[str, Any]], path: str | None = None, title: str = ''):
  """Histograms of what FlexRound learned: S2 = exp(log_s2) (per weight), s3 (per output channel), s4 (per input
  channel, convolutions), pooled over all kernels in ``states`` (``QuantizeResult.states`` with keep_states)."""
  pools = {'S2': [], 's3': [], 's4': []}
  for st in states.values():
    for key, name in (('log_s2', 'S2'), ('log_s3', 's3'), ('log_s4', 's4')):
      if key in st:
        pools[name].append(np.exp(np.asarray(st[key], np.float64)).ravel())
  present = [k for k, v in pools.items() if v]
  if not present:
    raise ValueError('states hold no FlexRound scales (quantize with method="flexround", keep_states=True)')
  fig, axes = _pyplot().subplots(1, len(present), figsize=(4 * len(present), 3.5), squeeze=False)
  for ax, name in zip(axes[0], present):
    values = np.concatenate(pools[name])
    ax.hist(values, bins=80, color='#1f77b4')
    ax.axvline(1.0, color='k', ls=':', lw=0.8)
    ax.set_yscale('log')
    ax.set_title(f'{name}  (n={values.size:,}, 1 at init)')
  fig.suptitle(title or 'FlexRound divisors after reconstruction')
  return _save(fig, path)


def rounding_moves(params, qtensors, rtn_qtensors=None) -> dict[str, dict[str, float]]:
  """Per kernel: the fraction of weights whose code lies beyond the two nearest grid points of W / s1 on the
  learned grid ('beyond_nearest': |q - W/s1| > 1), and, given RTN's codes, the fraction that differ from RTN."""
  flat = {name: np.asarray(leaf) for name, leaf in treepath.flatten(params).items()}
  out = {}
  for name, qt in qtensors.items():
    w = flat[name].reshape(qt.shape).astype(np.float64)
    scale = np.asarray(_layout.expand(np.asarray(qt.scale, np.float64), qt.spec, qt.shape[-2]))
    zp = np.asarray(_layout.expand(np.asarray(qt.zero_point), qt.spec, qt.shape[-2]))
    q = np.asarray(qt.codes).astype(np.int64) - zp
    x = w / scale
    lo, hi = qt.spec.code_range
    inside = (x >= lo - zp) & (x <= hi - zp)       # clipped weights cannot move beyond their bound
    entry = {'beyond_nearest': float(np.mean((np.abs(q - x) > 1.0) & inside))}
    if rtn_qtensors is not None and name in rtn_qtensors:
      entry['changed_vs_rtn'] = float(np.mean(np.asarray(rtn_qtensors[name].codes) != np.asarray(qt.codes)))
    out[name] = entry
  return out


def plot_rounding_moves(moves: Mapping[str, Mapping[str, float]], path: str | None = None, title: str = ''):
  names = list(moves)
  x = np.arange(len(names))
  fig, ax = _pyplot().subplots(figsize=(max(6, 0.4 * len(names) + 2), 4))
  ax.bar(x - 0.2, [100 * moves[n].get('changed_vs_rtn', np.nan) for n in names], 0.4, label='code differs from RTN')
  ax.bar(x + 0.2, [100 * moves[n]['beyond_nearest'] for n in names], 0.4, label='beyond the nearest grid points')
  ax.set_xticks(x, [n.removesuffix('/kernel') for n in names], rotation=60, ha='right', fontsize=7)
  ax.set_ylabel('% of weights')
  ax.set_title(title or 'Where FlexRound moved the rounding')
  ax.legend()
  return _save(fig, path)
