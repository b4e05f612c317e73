"""Runner: ``python -m flexround_jax.run --config configs/NAME.py --workdir DIR [--config.quant.weight.bits=3 ...]``.

Reads an ml_collections config file (``get_config()``, built on ``base_config()``), makes the task it names,
evaluates the float model, quantizes it, evaluates the result, and writes to the workdir:
  config.json, results.json (metrics, per-block report, wall time, commit), quantize_log.jsonl,
  block_losses.png and loss_curves.png (learned methods),
  quantized/ (Orbax: the dequantized params and every QTensor's codes, scale and zero point),
  checkpoints/ (per-block progress; a rerun with the same workdir resumes).
"""

from __future__ import annotations

from flexround_jax import cpu

if __name__ == '__main__':
  cpu.use_all_cores()   # one XLA device per core, before jax starts

import json
import os
import sys
import time

from absl import app, flags  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging as absl_logging  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # noqa: E402  pylint: disable=g-import-not-at-top

from flexround_jax import _extras, compile_cache, provenance, tasks  # noqa: E402  pylint: disable=g-import-not-at-top
from flexround_jax.engine import QuantConfig, quantize  # noqa: E402  pylint: disable=g-import-not-at-top
from flexround_jax.config_base import RUNNER_FIELDS  # noqa: E402  pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to an ml_collections config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for results, logs, checkpoints and the quantized model.')


def quant_config(q, workdir: str | None) -> QuantConfig:
  """QuantConfig from the ``quant`` section of a runner config (every field passed through as it is)."""
  fields = q.to_dict() if hasattr(q, 'to_dict') else dict(q)
  unknown = set(fields) & RUNNER_FIELDS
  if unknown:
    raise ValueError(f'config.quant sets {sorted(unknown)}, which the runner sets from --workdir')
  return QuantConfig.from_dict({**fields, 'checkpoint_dir': os.path.join(workdir, 'checkpoints') if workdir else None,
                                'log_dir': workdir})


def load_config_file(path: str):
  """``get_config()`` of an ml_collections config file (for scripts that loop over settings)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('flexround_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def run(config, workdir: str) -> dict:
  """Runs one config; returns (and writes) the results dict."""
  workdir = os.path.abspath(workdir)
  quant_config(config.quant, workdir)   # a bad quant section fails now, not after the model loads
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  figures = _extras.available('matplotlib')
  if not figures:
    absl_logging.warning("matplotlib is not installed: no loss plots (pip install 'flexround_jax[plots]')")
  t0 = time.time()
  commit = provenance.git_commit()   # the code this process runs (HEAD may move on during a long run)
  task = tasks.make(config.task, config.get('task_args', {}))
  q = config.quant
  if q.get('blocks') is None and task.blocks:
    q.unlock()
    q.blocks = task.blocks
  qcfg = quant_config(q, workdir)
  fp_metrics = task.evaluate(task.params) if config.get('eval_fp', True) else {}
  t1 = time.time()
  result = quantize(task.params, task.apply_fn, task.calib, qcfg)
  quant_s = time.time() - t1
  # With quantized activations the model is evaluated as reconstructed: its input quantizers in the forward.
  metrics = task.evaluate(result.params, result.apply_quantized(task.apply_fn)) if result.activations else \
      task.evaluate(result.params)
  from flexround_jax import export, plots  # pylint: disable=g-import-not-at-top
  export.save_orbax(os.path.join(workdir, 'quantized'), result, overwrite=True)   # a rerun (resume) re-exports
  if any(m.trains for m in qcfg.methods()) and figures:
    title = f'{task.name} W{qcfg.weight.bits} {qcfg.weight.granularity} {qcfg.method.name}'
    plots.block_losses(result, os.path.join(workdir, 'block_losses.png'), title=title)
    plots.loss_curves(result, os.path.join(workdir, 'loss_curves.png'), title=title)
    plots.plt.close('all')
  results = {
      'task': task.name, 'method': qcfg.method.name, 'method_args': qcfg.method.hparams, 'bits': qcfg.weight.bits,
      'granularity': qcfg.weight.granularity,
      'activation': None if qcfg.activation is None else qcfg.activation.describe(),
      'group_size': qcfg.weight.group_size, 'iters': qcfg.iters, 'seed': qcfg.seed, 'fp': fp_metrics,
      'quantized': metrics, 'quantize_wall_s': round(quant_s, 2), 'total_wall_s': round(time.time() - t0, 2),
      'resumed_units': result.resumed_units,   # units an earlier process ran: quantize_wall_s leaves them out
      'report': result.report, 'notes': task.notes, 'commit': commit,
      'host': provenance.host_info(),
  }
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2, default=float)
  return results


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)   # Orbax logs every file it writes at INFO
  if _CONFIG.value is None or _WORKDIR.value is None:
    print('usage: python -m flexround_jax.run --config configs/NAME.py --workdir DIR [--config.quant.weight.bits=3]',
          file=sys.stderr)
    sys.exit(2)
  compile_cache.enable(os.path.join(os.path.abspath(_WORKDIR.value), 'jax_cache'))   # a re-run skips compiles
  results = run(_CONFIG.value, _WORKDIR.value)
  print(json.dumps({k: results[k] for k in ('task', 'method', 'bits', 'fp', 'quantized', 'quantize_wall_s')},
                   indent=2, default=float))
  print(f'wrote {os.path.join(os.path.abspath(_WORKDIR.value), "results.json")}')


if __name__ == '__main__':
  app.run(main)
