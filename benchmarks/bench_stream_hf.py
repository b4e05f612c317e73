"""A 7B-shaped Hugging Face checkpoint (bfloat16 shards) planned and quantized layer by layer in under 8 GB.

Writes (once) a checkpoint folder in the Hugging Face layout: ``config.json`` (LlamaForCausalLM, the shape
``bench_stream.py`` uses: vocab 32000, width 4096, 32 layers, 32 heads, SwiGLU 11008, tied embeddings; 6.6 B params)
and bfloat16 safetensors shards ``model-0000i-of-0000n.safetensors`` of at most 5 GB with
``model.safetensors.index.json``, tensors under transformers' names in torch layout (out, in), one tensor in memory
at a time. Values are N(0, 0.02) (norm scales 1), copied from a 2^26-element random pool at random offsets
(faster than drawing 6.6 B normals; the values only have to be plausible weights). Then, each phase in its own process so that its peak
memory is its own:
  * dry: ``models.load_hf(DIR, stream=True)`` (tensors stay memory-mapped bfloat16; the model computes in float32)
    and ``fr.quantize(..., QuantConfig(dry_run=True))`` (W4 per-channel FlexRound, every decoder layer a unit): the
    plan with each unit's activation cache and training state per device;
  * layer: the same run with every layer but ``layers_0`` skipped by a rule, ``--iters`` FlexRound steps, with
    ``spill_dir``.
Each phase records its wall time, the kernel's peak RSS of the process (``VmHWM``, file pages of memory maps
included), the sampled peak RSS and peak anonymous memory (not file-backed), and passes if the peak RSS is under
8 GB (8 * 10^9 bytes, issue 33's target). With ``--fused-grad`` the layer phase uses
``fr.methods.flexround(fused_grad=True)`` (closed-form gradient, fewer kernel-sized temporaries) and is stored as
``layer_fused_grad``. Writes benchmarks/results/stream_7b_hf_<backend>.json. Needs ~13.3 GB of disk under
--workdir; ``--keep`` keeps the checkpoint (deleted otherwise once a dry and a layer phase are in the JSON).

  python benchmarks/bench_stream_hf.py [--workdir work/bench_stream_hf] [--iters 10] [--phases build,dry,layer]
  python benchmarks/bench_stream_hf.py --phases layer --fused-grad
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_JSON = {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': 32000, 'hidden_size': 4096,
               'num_hidden_layers': 32, 'num_attention_heads': 32, 'num_key_value_heads': 32,
               'intermediate_size': 11008, 'max_position_embeddings': 4096, 'rms_norm_eps': 1e-5,
               'rope_theta': 10000.0, 'hidden_act': 'silu', 'tie_word_embeddings': True, 'torch_dtype': 'bfloat16'}
SHARD_BYTES = 5 * 10**9   # transformers' save_pretrained default max_shard_size of 5GB
SEQ, SAMPLES, BATCH = 128, 4, 2
TARGET_BYTES = 8 * 10**9
PHASES = ('build', 'dry', 'layer')
POOL = 1 << 26


def build(folder):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flexround_jax import weights  # pylint: disable=g-import-not-at-top
  from flexround_jax.models import hf  # pylint: disable=g-import-not-at-top
  config = hf.decoder_config(CONFIG_JSON)
  shapes = hf.param_shapes(config)
  bf16 = np.dtype(ml_dtypes.bfloat16)
  specs = {}   # {HF name: (torch-layout shape, dtype)} in transformers' order
  for name, param in hf.hf_param_names(config).items():
    specs[name] = (shapes[param][::-1] if param[-1] == 'kernel' else shapes[param], bf16)
  shards, size = [[]], 0
  for name, (shape, _) in specs.items():
    nbytes = int(np.prod(shape)) * 2
    if shards[-1] and size + nbytes > SHARD_BYTES:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  rng = np.random.default_rng(0)
  pool = (rng.standard_normal(POOL, dtype=np.float32) * np.float32(0.02)).astype(bf16)

  def tensor(name, shape):
    if name.endswith('norm.weight'):
      return np.ones(shape, bf16)
    out = np.empty(int(np.prod(shape)), bf16)
    for start in range(0, out.size, POOL // 2):
      n = min(POOL // 2, out.size - start)
      offset = int(rng.integers(0, POOL - n + 1))
      out[start:start + n] = pool[offset:offset + n]
    return out.reshape(shape)

  os.makedirs(folder, exist_ok=True)
  files, weight_map, total = [], {}, 0
  for i, names in enumerate(shards):
    file = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    part = {n: specs[n] for n in names}
    total += weights.write_params(os.path.join(folder, file), part, ((n, tensor(n, s)) for n, (s, _) in part.items()),
                                  {'format': 'pt'}, overwrite=True)
    weight_map.update({n: file for n in names})
    files.append(file)
  with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': sum(int(np.prod(s)) * 2 for s, _ in specs.values())},
               'weight_map': weight_map}, f, indent=2)
  with open(os.path.join(folder, 'config.json'), 'w') as f:   # last: a folder with config.json is complete
    json.dump(CONFIG_JSON, f, indent=2)
  return {'shards': files, 'bytes_on_disk': total, 'params': int(sum(np.prod(s) for s, _ in specs.values()))}


def quantize(folder, workdir, one_layer: bool, iters: int, fused_grad: bool):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import flexround_jax as fr  # pylint: disable=g-import-not-at-top
  from flexround_jax.models import decoder, load_hf  # pylint: disable=g-import-not-at-top
  t = time.time()
  model = load_hf(folder, stream=True)
  out = {'load_s': round(time.time() - t, 2)}
  calib = np.random.default_rng(0).integers(0, CONFIG_JSON['vocab_size'], (SAMPLES, SEQ)).astype(np.int32)
  rules = [fr.Rule(r'layers_([1-9]|[1-9][0-9])/.*', skip=True)] if one_layer else []
  cfg = fr.QuantConfig(method=fr.methods.flexround(fused_grad=fused_grad),
                       weight=fr.QuantSpec(bits=4, granularity='per_channel'), blocks=decoder.BLOCK_REGEX,
                       iters=iters, batch_size=BATCH, rules=rules, dry_run=not one_layer,
                       spill_dir=os.path.join(workdir, 'spill'), progress=False)
  result = fr.quantize(model.params, model.apply_fn, calib, cfg)
  out.update({'units': len(result.plan), 'plan_unit0': result.plan[0],
              'peak_state_bytes_planned': max(p['state_bytes'] for p in result.plan),
              'peak_activation_bytes_planned': max(p['activation_bytes'] for p in result.plan)})
  if one_layer:
    rep = result.report[0]
    out.update({k: rep[k] for k in ('unit', 'seconds', 'seconds_train', 'state_bytes_per_device', 'loss_rtn',
                                    'loss_final')})
  return out


def _status_kb(field):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  return 0


def phase(name, folder, workdir, iters, fused_grad):
  from flexround_jax import provenance  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  with provenance.PeakRSS(every_s=0.05) as rss:
    out = build(folder) if name == 'build' else quantize(folder, workdir, name == 'layer', iters, fused_grad)
  hwm = _status_kb('VmHWM') * 1024
  out.update({'commit': provenance.git_commit(), 'wall_s': round(time.time() - t0, 1),
              'peak_rss_bytes': hwm, 'peak_rss_mb_sampled': round(rss.peak_mb, 1),
              'peak_anon_mb_sampled': round(rss.peak_anon_mb, 1), 'under_8gb': hwm < TARGET_BYTES})
  print('RESULT ' + json.dumps(out, default=float), flush=True)


def _host():
  from flexround_jax import provenance  # pylint: disable=g-import-not-at-top
  info = provenance.host_info()
  with open('/proc/cpuinfo') as f:
    text = f.read()
  model = [l.split(':', 1)[1].strip() for l in text.splitlines() if l.startswith('model name')]
  flags = [f for f in ('avx512_bf16', 'amx_bf16') if f in text.split()]
  return {**info, 'cpu_model': model[0] if model else None, 'cpu_flags': flags,
          'mem_total_gb': round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1e9, 1)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', default=os.path.join('work', 'bench_stream_hf'))
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--phases', default='build,dry,layer',
                      help='phases to (re)run; the others are kept from an existing JSON')
  parser.add_argument('--fused-grad', action='store_true',
                      help='the layer phase with flexround(fused_grad=True), stored as layer_fused_grad')
  parser.add_argument('--keep', action='store_true', help='keep the checkpoint folder afterwards')
  parser.add_argument('--phase', choices=PHASES, help=argparse.SUPPRESS)   # one child process
  args = parser.parse_args()
  folder = os.path.join(args.workdir, 'llama7b_bf16_hf')
  if args.phase:
    phase(args.phase, folder, args.workdir, args.iters, args.fused_grad)
    return
  os.makedirs(args.workdir, exist_ok=True)
  import jax  # pylint: disable=g-import-not-at-top
  out = os.path.join(HERE, 'results', f'stream_7b_hf_{jax.default_backend()}.json')
  results = json.load(open(out)) if os.path.exists(out) else {}
  wanted = args.phases.split(',')
  if set(wanted) - set(PHASES):
    parser.error(f'unknown --phases {sorted(set(wanted) - set(PHASES))}; choose from {PHASES}')
  for name in wanted:
    if name == 'build' and os.path.exists(os.path.join(folder, 'config.json')):
      continue
    proc = subprocess.run([sys.executable, __file__, '--phase', name, '--workdir', args.workdir,
                           '--iters', str(args.iters)] + ['--fused-grad'] * args.fused_grad,
                          capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
    if proc.returncode or not lines:
      sys.exit(f'phase {name} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    key = name + '_fused_grad' * (args.fused_grad and name == 'layer')
    results[key] = json.loads(lines[-1][len('RESULT '):])
    print(key, json.dumps(results[key]), flush=True)
  from flexround_jax import provenance  # pylint: disable=g-import-not-at-top
  sizes = [os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith('.safetensors')]
  results.update({'model': dict(CONFIG_JSON), 'layout': f'Hugging Face folder, {len(sizes)} bfloat16 shards',
                  'bytes_on_disk': sum(sizes), 'calibration': f'{SAMPLES} x {SEQ} random tokens',
                  'batch_size': BATCH, 'iters': args.iters, 'scheme': 'W4 per-channel FlexRound',
                  'target_bytes': TARGET_BYTES, 'host': _host(), 'commit': provenance.git_commit()})
  with open(out, 'w') as f:
    json.dump(results, f, indent=2)
  print('wrote', out)
  if not args.keep and 'dry' in results and {'layer', 'layer_fused_grad'} & set(results):
    shutil.rmtree(folder)
    print('removed', folder)


if __name__ == '__main__':
  main()
