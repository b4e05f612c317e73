"""The runner and the ``flexround-jax`` command.

  flexround-jax run CONFIG --workdir DIR [--scheme NAME] [--config.FIELD=VALUE ...]
  flexround-jax dry-run CONFIG [--workdir DIR] [--scheme NAME] [--config.FIELD=VALUE ...]
  flexround-jax presets
  flexround-jax quantize --model DIR --calib FILE.txt --out DIR [--scheme W4G128] [--method flexround]
      [--n-calib 128] [--seq-len 512] [--iters 250] [--format compressed-tensors] [--eval FILE.txt] [--dry-run]
  python -m flexround_jax.run --config CONFIG --workdir DIR [...]     (the same as ``run``)

``run`` reads an ml_collections config file (``get_config()``, built on ``config_base.base_config()``), applies the
preset (``--scheme``, ``presets.PRESETS``) and then the ``--config.*`` overrides, checks the whole config
(``config_base.check``), makes the task it names, evaluates the float model, quantizes it, evaluates the result, and
writes to the workdir:
  config.json, results.json (metrics, per-block report, wall time, commit), quantize_log.jsonl,
  block_losses.png and loss_curves.png (learned methods),
  quantized/ (Orbax: the dequantized params and every QTensor's codes, scale and zero point),
  checkpoints/ (per-block progress; a rerun with the same workdir resumes).
``dry-run`` makes the task and prints the engine's plan (units, kernels, bits, methods, memory) without quantizing.
``quantize`` quantizes a Hugging Face checkpoint folder (Llama, Mistral, Qwen2, Qwen3, Gemma 3) calibrated on a text
file, with no config file (``llm.quantize_llm``): it checks every input before reading a weight, shows progress bars,
and writes to --out quantize.json (the settings), checkpoints/ (a rerun of the same command resumes after the last
finished block; other settings are refused), results.json (per-block report, wall times, perplexity of the float and
quantized model on --eval) and the export (model/ in compressed-tensors format, or model.safetensors with --format
native). ``quantize --dry-run`` prints the plan and the memory and writes nothing. Bad input is one line on stderr and
exit code 2; a failure after loading (a checkpoint of other weights, an export the format cannot hold) exit code 1.

Importing this module does not import JAX (the command sets up one XLA device per CPU core first).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from flexround_jax import cpu

PROG = 'flexround-jax'
COMMANDS = ('run', 'dry-run', 'presets', 'quantize')


def quant_config(q, workdir: str | None):
  """QuantConfig from the ``quant`` section of a runner config (every field passed through as it is)."""
  from flexround_jax.config_base import RUNNER_FIELDS  # pylint: disable=g-import-not-at-top
  from flexround_jax.engine import QuantConfig  # pylint: disable=g-import-not-at-top
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
  if not callable(getattr(module, 'get_config', None)):
    from flexround_jax.config_base import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f'{path}: not a config file (it defines no get_config())')
  return module.get_config()


def run(config, workdir: str, phase=None) -> dict:
  """Runs one config; returns (and writes) the results dict. ``phase``: called with the name of each phase as it
  starts ('load', 'eval_fp', 'quantize', 'eval_quantized', 'export', 'plots'; e.g. ``provenance.PeakRSS.mark``)."""
  phase = phase or (lambda name: None)
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  from flexround_jax import _extras, config_base, provenance, tasks  # pylint: disable=g-import-not-at-top
  from flexround_jax.engine import quantize  # pylint: disable=g-import-not-at-top
  from flexround_jax.engine.loop import release_free_host_memory  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  config_base.check(config)   # any config mistake fails now (ConfigError naming its path), not after the model loads
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  figures = _extras.available('matplotlib')
  if not figures:
    absl_logging.warning("matplotlib is not installed: no loss plots (pip install 'flexround_jax[plots]')")
  t0 = time.time()
  commit = provenance.git_commit()   # the code this process runs (HEAD may move on during a long run)
  phase('load')
  task = tasks.make(config.task, config.get('task_args', {}))
  q = config.quant
  if q.get('blocks') is None and task.blocks:
    q.unlock()
    q.blocks = task.blocks
  qcfg = quant_config(q, workdir)
  phase('eval_fp')
  fp_metrics = task.evaluate(task.params) if config.get('eval_fp', True) else {}
  t1 = time.time()
  phase('quantize')
  result = quantize(task.params, task.apply_fn, task.calib, qcfg)
  quant_s = time.time() - t1
  task.params = None   # the float kernels' copy is not needed after quantizing (SmolLM2: 425 MB less from here on)
  release_free_host_memory()
  phase('eval_quantized')
  # With quantized activations the model is evaluated as reconstructed: its input quantizers in the forward.
  metrics = task.evaluate(result.params, result.apply_quantized(task.apply_fn)) if result.activations else \
      task.evaluate(result.params)
  from flexround_jax import export, plots  # pylint: disable=g-import-not-at-top
  release_free_host_memory()   # the evaluation's buffers, freed but kept by the allocator
  phase('export')
  export.save_orbax(os.path.join(workdir, 'quantized'), result, overwrite=True)   # a rerun (resume) re-exports
  phase('plots')
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




def dry_run(config, workdir: str | None = None):
  """Checks ``config``, makes its task and prints the engine's plan without quantizing (``QuantConfig.dry_run``);
  with ``workdir``, also whether its checkpoints belong to this run and where it would resume. Returns the
  QuantizeResult (``plan``)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from flexround_jax import config_base, tasks  # pylint: disable=g-import-not-at-top
  from flexround_jax.engine import quantize  # pylint: disable=g-import-not-at-top
  config_base.check(config)
  task = tasks.make(config.task, config.get('task_args', {}))
  q = config.quant
  if q.get('blocks') is None and task.blocks:
    q.unlock()
    q.blocks = task.blocks
  checkpoints = os.path.join(os.path.abspath(workdir), 'checkpoints') if workdir else None
  qcfg = dataclasses.replace(quant_config(q, None), dry_run=True, checkpoint_dir=checkpoints)
  return quantize(task.params, task.apply_fn, task.calib, qcfg)


_OVERRIDES_HELP = """\
overrides (after the preset, in any order; explicit overrides win):
  --config.FIELD=VALUE    any field of the config: --config.quant.iters=200 --config.quant.weight.bits=3
                          --config.quant.weight.granularity=per_group --config.quant.weight.group_size=64
                          --config.task_args.n_calib=128 --config.quant.blocks='layers_\\d+'
  method knobs            any keyword argument of the method's factory (flexround_jax.methods), set or not in the
                          config file: --config.quant.method.lr=1e-3
                          --config.quant.method.name=lrq --config.quant.method.rank=64
                          (a new method name starts from that method's defaults)
  activations             --config.quant.activation.name=per_token --config.quant.activation.bits=8
                          --config.quant.activation=None (weights only)
  own task                --config.task=my_pkg.tasks:make_task (a function (task_args) -> flexround_jax.tasks.Task;
                          the current folder is importable)
VALUE is a Python literal (3, 1e-3, True, None, (20.0, 2.0), {'name': 'lsq', 'bits': 8}) or else plain text.
"""


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=PROG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
      description='Post-training quantization of JAX/Flax models (FlexRound, LRQ, AdaRound, GPTQ, RTN) from a '
                  'config file, or of a Hugging Face LLM checkpoint in one command (quantize).',
      epilog='examples:\n'
             '  flexround-jax run configs/toy_mlp.py --workdir work/toy --scheme W4G128 --config.quant.iters=200\n'
             '  flexround-jax dry-run configs/minilm.py --scheme W4A8\n'
             '  flexround-jax presets\n'
             '  flexround-jax quantize --model ckpt/Qwen2.5-0.5B --scheme W4G128 --calib calib.txt --out work/q\n'
             'run `flexround-jax run --help` for the overrides, `flexround-jax quantize --help` for quantize.')
  commands = parser.add_subparsers(dest='command', metavar='COMMAND')
  for name, text in [('run', 'quantize the model of a config file and write everything to a workdir'),
                     ('dry-run', "check a config and print the engine's plan (units, kernels, bits, memory); no "
                                 'quantization')]:
    sub = commands.add_parser(name, help=text, description=text, epilog=_OVERRIDES_HELP, allow_abbrev=False,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument('config_file', nargs='?', metavar='CONFIG', help='a config file (configs/NAME.py)')
    sub.add_argument('--config', dest='config_flag', metavar='CONFIG', help='the same as CONFIG (older form)')
    sub.add_argument('--workdir', required=name == 'run', metavar='DIR',
                     help='folder for results, logs, checkpoints and the quantized model; a rerun resumes there'
                     if name == 'run' else "check that DIR's checkpoints are this run's and say where it resumes")
    sub.add_argument('--scheme', metavar='NAME',
                     help='a preset (W4, W4G128, W3G128, W8A8, W4A8, GGUF-Q4_0; see `flexround-jax presets`), '
                          'applied to config.quant before the --config.* overrides')
  commands.add_parser('presets', help='list the presets that --scheme and fr.preset() take')
  _quantize_parser(commands)
  return parser


def _quantize_parser(commands) -> None:
  text = 'quantize a Hugging Face checkpoint folder calibrated on a text file, and export it (no config file)'
  sub = commands.add_parser(
      'quantize', help=text, description=text, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog='example:\n  flexround-jax quantize --model ckpt/Qwen2.5-0.5B --scheme W4G128 --method flexround '
             '--calib calib.txt \\\n      --n-calib 128 --seq-len 512 --iters 250 --out work/qwen-w4g128 '
             '--eval eval.txt\nrerun the same command after a crash: it resumes after the last finished block.')
  sub.add_argument('--model', required=True, metavar='DIR',
                   help='checkpoint folder: config.json, model.safetensors (or shards + index), tokenizer.json')
  sub.add_argument('--calib', required=True, metavar='FILE', help='UTF-8 calibration text')
  sub.add_argument('--out', metavar='DIR', help='folder for settings, checkpoints, results.json and the export: new, '
                   'empty, or a run of the same settings (resumed); optional with --dry-run')
  sub.add_argument('--scheme', default='W4G128', metavar='NAME', help='a preset (W4, W4G128, W3G128, W8A8, W4A8, '
                   'GGUF-Q4_0; see `flexround-jax presets`); default W4G128')
  sub.add_argument('--method', default='flexround', metavar='NAME',
                   help='rtn, adaround, flexround, gptq, lrq, gptq+flexround, gptq+lrq; default flexround')
  sub.add_argument('--n-calib', type=int, default=128, metavar='N', help='calibration windows (default 128)')
  sub.add_argument('--seq-len', type=int, default=512, metavar='T', help='tokens per window (default 512)')
  sub.add_argument('--iters', type=int, default=250, metavar='N', help='optimizer steps per block (default 250)')
  sub.add_argument('--batch-size', type=int, metavar='N', help='windows per step (default min(32, n-calib))')
  sub.add_argument('--rank', type=int, metavar='R', help='rank of lrq / gptq+lrq')
  sub.add_argument('--seed', type=int, default=0, metavar='N', help='default 0')
  sub.add_argument('--dtype', default='float32', metavar='DTYPE', help='params while quantizing: float32 (default) '
                   'or bfloat16')
  sub.add_argument('--format', default='compressed-tensors', metavar='FORMAT',
                   help='compressed-tensors (default: out/model/, what vLLM loads) or native (out/model.safetensors)')
  sub.add_argument('--eval', metavar='FILE', help='UTF-8 text: perplexity of the float and the quantized model')
  sub.add_argument('--eval-windows', type=int, metavar='N', help='score only the first N windows of --eval')
  sub.add_argument('--dry-run', action='store_true', help="check everything, print the engine's plan and the "
                   'memory; quantize and write nothing')
  sub.add_argument('--no-progress', action='store_true', help='no progress bars')


def quantize_command(args) -> int:
  """``flexround-jax quantize``: 0, 2 for bad input (checked before any weight is read), 1 for a failure after."""
  if 'jax' not in sys.modules:
    cpu.use_all_cores()   # one XLA device per core, before jax starts
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  from flexround_jax import compile_cache, llm  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)   # Orbax logs every file it writes at INFO
  kwargs = dict(calib=args.calib, scheme=args.scheme, method=args.method, n_calib=args.n_calib,
                seq_len=args.seq_len, iters=args.iters, format=args.format, eval_file=args.eval,
                eval_windows=args.eval_windows, rank=args.rank, batch_size=args.batch_size, seed=args.seed,
                dtype=args.dtype, progress=not args.no_progress, dry_run=args.dry_run)
  try:
    job = llm.prepare(args.model, args.out, **kwargs)
    if not args.dry_run:
      llm.start(job)
      compile_cache.enable(os.path.join(job.out, 'jax_cache'))   # a rerun (resume) skips compiles
    results = llm.run(job)
  except llm.InputError as e:
    return _error(str(e))
  except (ValueError, FileExistsError) as e:   # the loader's, the engine's or the exporter's named error
    print(f'{PROG}: error: {e}'.replace('\n', ' '), file=sys.stderr)
    return 1
  if args.dry_run:
    return 0
  summary = {k: results[k] for k in ('perplexity', 'quantize_wall_s', 'resumed_units', 'kernels')}
  print(json.dumps({'scheme': results['settings']['scheme'], 'method': results['settings']['method']['name'],
                    **summary}, indent=2, default=float))
  print(f'wrote {results["export"]["path"]} ({results["format"]}) and '
        f'{os.path.join(os.path.abspath(args.out), "results.json")}')
  return 0


def split_overrides(argv: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
  """(overrides [(path below config, value text)], other arguments) from ``--config.PATH=VALUE`` or
  ``--config.PATH VALUE`` arguments."""
  overrides, rest, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config.'):
      path, eq, value = arg[len('--config.'):].partition('=')
      if not eq:
        if i + 1 == len(argv):
          raise ValueError(f'{arg}: no value (--config.{path}=VALUE)')
        i, value = i + 1, argv[i + 1]
      overrides.append((path, value))
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def _presets_table() -> str:
  from flexround_jax import presets  # pylint: disable=g-import-not-at-top
  rows = [('name', 'weights', 'activations', 'method')]
  rows += [(p.name, *p.summary().values()) for p in presets.PRESETS.values()]
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _error(message: str) -> int:
  print(f'{PROG}: error: {message}', file=sys.stderr)
  return 2


def main(argv: list[str] | None = None) -> int:
  """The ``flexround-jax`` command (and ``python -m flexround_jax.run``); returns the exit code: 0, or 2 for a
  mistake in the command line or the config (one line on stderr)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = _parser()
  try:
    overrides, rest = split_overrides(argv)
  except ValueError as e:
    return _error(str(e))
  if not rest:
    parser.print_help(sys.stderr)
    return 2
  if rest[0] not in COMMANDS and rest[0] not in ('-h', '--help'):
    rest = ['run'] + rest   # python -m flexround_jax.run --config CONFIG --workdir DIR
  args = parser.parse_args(rest)
  if args.command == 'quantize':
    if overrides:
      return _error('quantize takes no --config.* overrides')
    return quantize_command(args)
  if args.command == 'presets':
    if overrides:
      return _error('presets takes no --config.* overrides')
    print(_presets_table())
    return 0
  if args.config_file and args.config_flag:
    return _error(f'two config files: {args.config_file} and --config {args.config_flag}')
  path = args.config_file or args.config_flag
  if not path:
    return _error(f'no config file: {PROG} {args.command} CONFIG (e.g. configs/toy_mlp.py)')
  if not os.path.isfile(path):
    return _error(f'{path}: no such config file')
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())   # --config.task=my_tasks:make, as ``python -m`` would import it
  if 'jax' not in sys.modules:
    cpu.use_all_cores()   # one XLA device per core, before jax starts
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  from flexround_jax import compile_cache, config_base  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)   # Orbax logs every file it writes at INFO
  try:
    config = load_config_file(path)
    if args.scheme:
      config_base.apply_preset(config, args.scheme)
    config_base.apply_overrides(config, overrides)
    config_base.check(config)
  except config_base.ConfigError as e:
    return _error(str(e))
  if args.command == 'dry-run':
    dry_run(config, args.workdir)
    return 0
  compile_cache.enable(os.path.join(os.path.abspath(args.workdir), 'jax_cache'))   # a re-run skips compiles
  results = run(config, args.workdir)
  print(json.dumps({k: results[k] for k in ('task', 'method', 'bits', 'fp', 'quantized', 'quantize_wall_s')},
                   indent=2, default=float))
  print(f'wrote {os.path.join(os.path.abspath(args.workdir), "results.json")}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
