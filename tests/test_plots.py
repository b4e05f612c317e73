"""Every figure renders to a PNG from a real (tiny) QuantizeResult or results rows."""

import numpy as np

import flexround_jax as fr
from flexround_jax import plots

import tiny_models


def _png(path):
  data = open(path, 'rb').read()
  assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 2000


def test_figures_render(tmp_path):
  params, apply_fn, calib = tiny_models.cnn()
  spec = fr.QuantSpec(bits=3, granularity='per_tensor')
  cfg = fr.QuantConfig(method=fr.methods.flexround(lr=1e-2), weight=spec, blocks=r'ResBlock_\d+', iters=60, batch_size=16,
                       progress=False, keep_states=True)
  result = fr.quantize(params, apply_fn, calib, cfg)
  rtn = fr.quantize(params, apply_fn, calib, fr.QuantConfig(method='rtn', weight=spec, blocks=r'ResBlock_\d+',
                                                            progress=False))
  plots.block_losses(result, str(tmp_path / 'losses.png'))
  plots.loss_curves(result, str(tmp_path / 'curves.png'))
  plots.flexround_scales(result.states, str(tmp_path / 'scales.png'))
  moves = plots.rounding_moves(params, result.qtensors, rtn.qtensors)
  assert set(moves) == set(result.qtensors)
  assert all(0 <= m['beyond_nearest'] <= 1 and 0 <= m['changed_vs_rtn'] <= 1 for m in moves.values())
  assert any(m['changed_vs_rtn'] > 0 for m in moves.values())
  assert all(m['beyond_nearest'] == 0 for m in plots.rounding_moves(params, rtn.qtensors).values())
  plots.plot_rounding_moves(moves, str(tmp_path / 'moves.png'))
  rows = [{'method': m, 'bits': b, 'seed': s, 'quantized': {'top1': 90 - 10 / b + s + (m == 'flexround')}}
          for m in ('rtn', 'flexround') for b in (2, 3, 4) for s in (0, 1)]
  plots.metric_vs_bits(rows, 'quantized.top1', str(tmp_path / 'bits.png'))
  assert plots.metric_vs_bits(rows, 'quantized.top1').axes[0].get_yscale() == 'linear'
  assert plots.metric_vs_bits(rows, 'quantized.top1', log_y=True).axes[0].get_yscale() == 'log'
  for name in ('losses', 'curves', 'scales', 'moves', 'bits'):
    _png(tmp_path / f'{name}.png')


def test_metric_vs_bits_colours_by_method_and_styles_by_setting():
  """12 lines (2 granularities x 6 methods): one colour per method, one line style per granularity, no two lines
  alike (matplotlib's default cycle would repeat a colour from the 11th line on)."""
  methods = ('rtn', 'gptq', 'adaround', 'flexround', 'lrq', 'gptq+flexround')
  rows = [{'granularity': g, 'method': m, 'bits': b, 'quantized': {'ppl': 20.0 + i + b}}
          for g in ('per_channel', 'per_group') for i, m in enumerate(methods) for b in (3, 4)]
  ax = plots.metric_vs_bits(rows, 'quantized.ppl', group='granularity+method').axes[0]
  handles, labels = ax.get_legend_handles_labels()
  styles = {label: (h.lines[0].get_color(), h.lines[0].get_linestyle()) for h, label in zip(handles, labels)}
  assert len(styles) == 12 and len(set(styles.values())) == 12
  for m in methods:
    assert styles[f'per_channel / {m}'][0] == styles[f'per_group / {m}'][0]
  assert len({styles[f'per_channel / {m}'][0] for m in methods}) == 6
  assert {styles[f'per_channel / {m}'][1] for m in methods} != {styles[f'per_group / {m}'][1] for m in methods}
