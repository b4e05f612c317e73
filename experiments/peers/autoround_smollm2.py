r"""Intel AutoRound (auto-round 0.16.1: SignRound, signed-gradient rounding plus min/max tuning) on SmolLM2-135M,
scored with our perplexity protocol. Runs in `make peers`'s venv (torch CPU, transformers, auto-round: never in
.venv, never imported by the library or the tests).

  .venv-peers/bin/python experiments/peers/autoround_smollm2.py --bits 4 --group-size -1       # its defaults
  .venv-peers/bin/python experiments/peers/autoround_smollm2.py --bits 4 --group-size 128
  .venv-peers/bin/python experiments/peers/autoround_smollm2.py --bits 3 --group-size 128
  .venv-peers/bin/python experiments/peers/autoround_smollm2.py --bits 4 --group-size -1 --iters 250 --batch-size 2
  # the first N decoder layers only (smoke run, per-layer timing): JSON under experiments/results/peers/partial/
  .venv-peers/bin/python experiments/peers/autoround_smollm2.py --layers 2 --iters 4 --max-windows 4

1. Model: our ``Decoder`` from the GGUF (``models.gguf.load_smollm2``: the dequantized Q4_1 weights, the float
   baseline of our tables), written by ``export.save_hf`` as a Hugging Face folder and read by transformers'
   ``LlamaForCausalLM`` in float32. Float check: per-window NLL of the torch model and of our JAX model on the first
   ``--float-check-windows`` evaluation windows.
2. Calibration: our 128 x 512-token windows (``evals.perplexity.calibration_tokens``: articles[:80] through our
   tokenizer, which keeps SmolLM2's digit splitting that transformers' GGUF tokenizer conversion drops) as int64
   tensors: AutoRound's ``dataset``.
3. ``AutoRound(model, tokenizer, bits=, group_size=, sym=False, iters=, nsamples=128, seqlen=512, batch_size=,
   dataset=, device_map='cpu', seed=42).quantize()``; everything else at its defaults (lr = 1 / iters, min/max tuning
   with the same lr, its ``amp``: bfloat16 tuning on a CPU with bf16 instructions, else float32). Then
   ``save_quantized(format='auto_round:gptqmodel')``: packed codes, float16 scales and zero points.
4. Read back: ``autoround_format.read_checkpoint`` -> our QTensors -> ``engine.dequantize_params`` into the
   ``Decoder``'s params (embedding and norms stay our float ones, as in every row of our tables). Checked against
   AutoRound's in-memory result: its scales and zero points, and the codes its packer derives from its qdq weights.
5. Score: ``evals.perplexity`` protocol (359 windows of 512 tokens, exp(mean NLL of tokens 1..511), the same
   ``window_nll`` on the full logits as the task's ``perplexity``); the per-window mean NLL goes next to the JSON
   (``.window_nll.txt``, one line per window) for ``evals.perplexity.paired_nll_difference``.

Resumes by stage: a finished AutoRound folder in the workdir is read back and scored without quantizing again.
AutoRound does not resume a tuning run cut short: that restarts at layer 0. Nothing is downloaded: the Hugging
Face libraries run offline (HF_HUB_OFFLINE) and the calibration data are ours.
"""

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')            # before transformers / auto-round import huggingface_hub
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import dataclasses
import gc
import importlib.metadata
import json
import math
import shutil
import sys
import time

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import autoround_format  # experiments/peers/: the read-back, and the per-window scoring
import window_nll
from flexround_jax import dequantize_params, export, provenance
from flexround_jax.evals import perplexity
from flexround_jax.models import gguf

RESULTS = os.path.join(ROOT, 'experiments', 'results', 'peers')
# AutoRound's own packed format, with the zero points stored as they are. Plain 'auto_round' sends 4-bit asymmetric
# weights to its AWQ packer, which fails in 0.16.1 after quantize() (TypeError: WQLinear_GEMM.__init__() got an
# unexpected keyword argument 'weight_dtype'); 'auto_round:auto_gptq' stores zero point - 1, clamped at 0.
EXPORT_FORMAT = 'auto_round:gptqmodel'
VERSIONS = ('auto-round', 'torch', 'transformers', 'accelerate', 'jax', 'numpy')


def _tag(bits: int, group_size: int) -> str:
  """The setting's name as experiments/llm_ptq.py spells it: per_channel_w4, per_group128_w3."""
  return f'per_channel_w{bits}' if group_size == -1 else f'per_group{group_size}_w{bits}'


def _versions() -> dict:
  out = {}
  for name in VERSIONS:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def _host() -> dict:
  with open('/proc/cpuinfo') as f:
    flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
  return {**provenance.host_info(), 'bf16_flags': sorted({'amx_bf16', 'avx512_bf16'} & set(flags))}


def _truncated(model, num_layers: int | None):
  """(params, config) of the first ``num_layers`` decoder layers of an ``HFModel`` (all when None)."""
  if num_layers is None or num_layers >= model.config.num_layers:
    return model.params, model.config
  keep = {f'layers_{i}' for i in range(num_layers)}
  params = {k: v for k, v in model.params.items() if not k.startswith('layers_') or k in keep}
  return params, dataclasses.replace(model.config, num_layers=num_layers)


def torch_window_nll(model, windows, batch_size: int = 4) -> np.ndarray:
  """(N,) mean NLL per window of tokens 1..T-1 of a transformers causal LM, in float32 like our JAX forward."""
  import torch
  out = []
  with torch.no_grad():
    for start in range(0, len(windows), batch_size):
      ids = torch.from_numpy(np.asarray(windows[start:start + batch_size], np.int64))
      logits = model(input_ids=ids).logits[:, :-1].float()
      nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction='none')
      out.append(nll.double().mean(-1).numpy())
  return np.concatenate(out)


def load_torch_model(hf_dir: str):
  import torch
  import transformers
  model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True)
  return model.eval()


def float_check(model, windows, jax_nll) -> dict:
  """The transformers model against our JAX Decoder on the same windows: perplexity of each, largest per-window
  difference in mean NLL."""
  t0 = time.time()
  torch_nll = torch_window_nll(model, windows)
  check = {'windows': len(windows), 'num_layers': model.config.num_hidden_layers,
           'ppl_torch': math.exp(float(np.mean(torch_nll))), 'ppl_jax': math.exp(float(np.mean(jax_nll))),
           'max_abs_window_nll_diff': float(np.max(np.abs(torch_nll - jax_nll))), 'torch_s': round(time.time() - t0, 1)}
  print('float check:', json.dumps(check), flush=True)
  return check


def in_memory_grid(model, bits: int, group_size: int) -> dict:
  """{module name: (codes (out, in) uint8, scale (out, groups) float32, zero point (out, groups) int32, max |W_qdq -
  scale * (codes - zp)|)} of every layer AutoRound quantized, read from the layer as its packer reads it: codes =
  clamp(round(W / scale + zp), 0, 2**b - 1) (``qlinear_torch.QuantLinear.pack_248_bits``), input channel i in group
  i // group_size (the last group is partial where group_size does not divide the input size: 576 at 128)."""
  import torch
  out = {}
  for name, module in model.named_modules():
    scale = getattr(module, 'scale', None)
    if not isinstance(module, torch.nn.Linear) or scale is None or getattr(module, 'bits', 16) >= 16:
      continue
    w = module.weight.detach().float()
    n_in = w.shape[1]
    s = scale.float().reshape(w.shape[0], -1)
    zp = torch.as_tensor(module.zp).float().reshape(w.shape[0], -1)
    g = n_in if group_size == -1 else group_size
    if s.shape[1] != -(-n_in // g):
      raise ValueError(f'{name}: {s.shape[1]} scale groups for {n_in} inputs at group size {group_size}')
    s_full, zp_full = s.repeat_interleave(g, 1)[:, :n_in], zp.repeat_interleave(g, 1)[:, :n_in]
    codes = torch.clamp(torch.round(w / s_full + zp_full), 0, 2 ** bits - 1)
    err = float((w - s_full * (codes - zp_full)).abs().max())
    out[name] = (codes.to(torch.uint8).numpy(), s.numpy(), zp.to(torch.int32).numpy(), err)
  return out


def readback_check(by_module: dict, grid: dict) -> dict:
  """Our read-back of the saved folder against AutoRound's in-memory grid: codes, scales, zero points all equal."""
  same = {name: bool(np.array_equal(np.asarray(qt.codes).T, grid[name][0])
                     and np.array_equal(np.asarray(qt.scale).T, grid[name][1])
                     and np.array_equal(np.asarray(qt.zero_point).T, grid[name][2]))
          for name, qt in by_module.items() if name in grid}
  return {'layers_read': len(by_module), 'layers_in_memory': len(grid), 'layers_compared': len(same),
          'codes_scales_zeros_equal': bool(same) and all(same.values()) and len(same) == len(grid),
          'max_abs_qdq_off_grid': max((g[3] for g in grid.values()), default=None)}


def run_autoround(args, hf_dir: str, ar_dir: str, calib: np.ndarray, tokenizer, check_windows,
                  jax_check_nll) -> tuple[dict, dict]:
  """Steps 1-3 and the in-memory half of step 4: float check, AutoRound's quantize() and save_quantized() -> (run
  info, ``in_memory_grid``)."""
  import torch
  import transformers
  from auto_round import AutoRound

  model = load_torch_model(hf_dir)
  info = {'float_check': float_check(model, check_windows, jax_check_nll)} if len(check_windows) else {}
  hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)
  ids = torch.from_numpy(calib.astype(np.int64))
  dataset = list(torch.split(ids, args.batch_size))
  kwargs = dict(bits=args.bits, group_size=args.group_size, sym=False, iters=args.iters, nsamples=len(calib),
                seqlen=calib.shape[1], batch_size=args.batch_size, dataset=dataset, device_map='cpu', seed=args.seed)
  if args.lr is not None:
    kwargs['lr'] = args.lr
  ar = AutoRound(model, hf_tokenizer, **kwargs)
  t0 = time.time()
  with provenance.PeakRSS() as rss:
    ar.quantize()
  info['quantize_wall_s'] = round(time.time() - t0, 1)
  info['quantize_peak_rss_mb'] = round(rss.peak_mb, 1)
  qc, ctx = getattr(ar, 'quantize_config', None), getattr(ar, 'model_context', None)
  resolved = {k: getattr(qc, k, None) for k in ('iters', 'lr', 'minmax_lr', 'enable_minmax_tuning', 'nblocks',
                                                'momentum', 'gradient_accumulate_steps', 'not_use_best_mse',
                                                'enable_quanted_input', 'enable_adam', 'bits', 'group_size', 'sym',
                                                'data_type', 'scale_dtype')}
  resolved.update({'amp': getattr(ctx, 'amp', None), 'amp_dtype': str(getattr(ctx, 'amp_dtype', None)),
                   'batch_size': args.batch_size, 'nsamples': len(calib), 'seqlen': int(calib.shape[1]),
                   'seed': args.seed,
                   'enable_torch_compile': getattr(getattr(ar, 'compress_context', None), 'enable_torch_compile',
                                                   getattr(ar, 'enable_torch_compile', None))})
  info['autoround'] = {k: (v if isinstance(v, (bool, int, float, str, type(None))) else str(v))
                       for k, v in resolved.items()}
  print('autoround:', json.dumps(info['autoround']), flush=True)
  grid = in_memory_grid(model, args.bits, args.group_size)
  tmp = ar_dir + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  t0 = time.time()
  ar.save_quantized(tmp, format=EXPORT_FORMAT, inplace=True)
  info['save_wall_s'] = round(time.time() - t0, 1)
  os.replace(tmp, ar_dir)                        # only a complete folder counts as a finished stage
  with open(os.path.join(ar_dir, 'run_info.json'), 'w') as f:
    json.dump(info, f, indent=2)
  del ar, model
  gc.collect()
  return info, grid


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--bits', type=int, default=4)
  parser.add_argument('--group-size', type=int, default=-1, help='-1: per output channel (AutoRound\'s spelling)')
  parser.add_argument('--iters', type=int, default=200, help='steps per decoder layer (AutoRound default 200)')
  parser.add_argument('--batch-size', type=int, default=8, help='samples per step (AutoRound default 8)')
  parser.add_argument('--lr', type=float, default=None, help='default: AutoRound\'s (1 / iters)')
  parser.add_argument('--seed', type=int, default=42, help='AutoRound\'s default seed')
  parser.add_argument('--layers', type=int, default=None, help='quantize only the first N decoder layers (the '
                      'model is cut to them for AutoRound; scoring puts them into the whole model)')
  parser.add_argument('--max-windows', type=int, default=None, help='score the first N of the 359 windows')
  parser.add_argument('--float-check-windows', type=int, default=8)
  parser.add_argument('--float-check-only', action='store_true', help='only step 1 on the whole model: '
                      'experiments/results/peers/autoround_float_check.json')
  parser.add_argument('--workdir', default=os.path.join(ROOT, 'work', 'peers'))
  parser.add_argument('--out-dir', default=None, help='default experiments/results/peers (partial/ with --layers '
                      'or --max-windows)')
  args = parser.parse_args()

  name = f'autoround_{_tag(args.bits, args.group_size)}_it{args.iters}_b{args.batch_size}'
  if args.lr is not None:
    name += f'_lr{args.lr:g}'
  if args.layers is not None:
    name += f'_L{args.layers}'
  partial = args.layers is not None or args.max_windows is not None
  out_dir = args.out_dir or (os.path.join(RESULTS, 'partial') if partial else RESULTS)
  out = os.path.join(out_dir, name + ('' if args.max_windows is None else f'_n{args.max_windows}') + '.json')
  workdir = os.path.join(args.workdir, name)
  hf_dir, ar_dir = os.path.join(workdir, 'hf_float'), os.path.join(workdir, 'autoround')
  os.makedirs(workdir, exist_ok=True)
  t_start = time.time()

  with provenance.PeakRSS() as rss_total:
    source = gguf.load_smollm2()
    tokenizer = source.tokenizer
    calib = perplexity.calibration_tokens(128, 512, tokenizer)
    windows = perplexity.evaluation_windows(tokenizer)
    params, config = _truncated(source, args.layers)
    info = None
    if os.path.isdir(ar_dir):
      print(f'{ar_dir} exists: reading it back without quantizing again', flush=True)
      with open(os.path.join(ar_dir, 'run_info.json')) as f:
        info, grid = json.load(f), None
    else:
      _, meta = gguf.open_gguf(gguf.smollm2_path(), tensors=False)
      export.save_hf(hf_dir, params, config, tokenizer=tokenizer, config_fields=gguf.hf_config_fields(meta),
                     overwrite=True)
      check = windows[:args.float_check_windows]
      module = type(source.module)(config)
      jax_check = (window_nll.window_nll(lambda p, t: module.apply({'params': p}, t), params, check) if len(check)
                   else np.zeros(0))
      if args.float_check_only:
        check = float_check(load_torch_model(hf_dir), check, jax_check)
        shutil.rmtree(hf_dir, ignore_errors=True)
        path = os.path.join(args.out_dir or RESULTS, 'autoround_float_check.json')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savetxt(window_nll.nll_path(path), jax_check, fmt='%.12f')   # our float model's, for paired prefixes
        with open(path, 'w') as f:
          json.dump({**check, 'reference_ppl_359_windows': 20.074,
                     'window_nll_file': os.path.relpath(window_nll.nll_path(path), ROOT), 'host': _host(), 'versions': _versions(),
                     'commit': provenance.git_commit(), 'wall_s': round(time.time() - t_start, 1),
                     'command': 'python experiments/peers/autoround_smollm2.py ' + ' '.join(sys.argv[1:])}, f,
                    indent=2)
        return
      del params, source
      gc.collect()
      info, grid = run_autoround(args, hf_dir, ar_dir, calib, tokenizer, check, jax_check)
      shutil.rmtree(hf_dir, ignore_errors=True)
      source = gguf.load_smollm2()

    qc, by_module = autoround_format.read_checkpoint(ar_dir)
    check = (readback_check(by_module, grid) if grid is not None else
             {'layers_read': len(by_module), 'note': 'resumed from the saved folder: AutoRound\'s in-memory grid was '
                                                     'compared by the run that saved it, not by this one'})
    info['readback'] = check
    print('read back:', json.dumps(check), flush=True)
    qtensors = autoround_format.decoder_qtensors(by_module, source.config)
    params_q = dequantize_params(source.params, qtensors)
    eval_windows = windows[:args.max_windows]
    t0 = time.time()
    nll = window_nll.window_nll(source.apply_fn, params_q, eval_windows)
    eval_s = time.time() - t0

  os.makedirs(out_dir, exist_ok=True)
  nll_file = window_nll.nll_path(out)
  np.savetxt(nll_file, nll, fmt='%.12f')
  n_tokens = len(eval_windows) * (windows.shape[1] - 1)
  result = {
      'method': 'autoround',
      'model': 'SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized = the float baseline), as transformers '
               'LlamaForCausalLM float32 for AutoRound, as our Decoder for scoring',
      'setting': _tag(args.bits, args.group_size), 'bits': args.bits, 'group_size': args.group_size, 'sym': False,
      'layers_quantized': len(qtensors) // 7, 'kernels_quantized': len(qtensors),
      'ppl': round(math.exp(float(np.mean(nll))), 4), 'nll': float(np.mean(nll)),
      'n_windows': len(eval_windows), 'n_windows_available': int(len(windows)), 'n_tokens': n_tokens,
      'window_nll_file': os.path.relpath(nll_file, ROOT),
      'protocol': 'evals.perplexity: wiki.evaluation_articles() joined with "\\n\\n", tokenized once, 512-token '
                  'windows, exp(mean NLL of tokens 1..511); per-window mean NLL in window_nll_file',
      'calibration': '128 x 512 tokens of wiki.calibration_articles() (articles[:80]), our tokenizer',
      'quantization_config': qc, **info, 'eval_s': round(eval_s, 1),
      'wall_s': round(time.time() - t_start, 1), 'peak_rss_mb': round(rss_total.peak_mb, 1),
      'host': _host(), 'versions': _versions(), 'commit': provenance.git_commit(),
      'command': 'python experiments/peers/autoround_smollm2.py ' + ' '.join(sys.argv[1:]),
  }
  with open(out, 'w') as f:
    json.dump(result, f, indent=2, default=str)
  print(json.dumps({k: result[k] for k in ('setting', 'ppl', 'n_windows', 'wall_s', 'peak_rss_mb')}), flush=True)


if __name__ == '__main__':
  main()
