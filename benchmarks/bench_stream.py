"""Quantizing a model larger than this machine's free RAM: a 7B-shaped Llama streamed from a memory-mapped file.

Builds (once) a Llama-2-7B-shaped model (vocab 32000, width 4096, 32 layers, 32 heads, SwiGLU 11008; 6.7 B params)
with random bfloat16 weights in a safetensors file, written one tensor at a time (``weights.write_params``). Then,
each phase in its own process so that its peak memory is its own:
  * dry run: ``fr.quantize(..., QuantConfig(dry_run=True))`` on the memory-mapped params (W4 per-channel FlexRound,
    every decoder layer a unit): the plan with each unit's activation cache and training state per device;
  * one layer: the same run with every layer but ``layers_0`` skipped by a rule, ``ITERS`` FlexRound steps, with
    ``spill_dir`` (the finished unit's params and codes go to disk);
  * step: XLA's memory analysis of that layer's compiled training step (arguments, temporaries), from shapes;
  * checks: planning's value checks of every leaf (all finite, max |w|), the engine's bit-level host path against
    numpy's isfinite/max/min on the same memory-mapped pages (not run by default: ``--phases checks``).
With ``--fused-grad`` the layer and step phases use ``fr.methods.flexround(fused_grad=True)`` (closed-form gradient,
fewer kernel-sized temporaries) and are stored as ``layer_fused_grad`` / ``step_fused_grad`` next to the default's.
Each phase records its wall time, peak RSS, and peak anonymous (not file-backed) resident memory: pages of the
memory-mapped file count in RSS while mapped, but the kernel drops them under pressure, so anonymous memory is what
the run needs. Writes benchmarks/results/stream_7b_<backend>.json. Needs ~14 GB of disk under --workdir.

  python benchmarks/bench_stream.py [--workdir work/bench_stream] [--iters 10] [--phases build,dry,layer,step]
  python benchmarks/bench_stream.py --phases layer,step --fused-grad
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, ffn_dim=11008,
              max_seq_len=4096)
SEQ, SAMPLES, BATCH = 128, 8, 2
PHASES = ('build', 'dry', 'layer', 'step', 'checks')


def build(path):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flexround_jax import weights  # pylint: disable=g-import-not-at-top
  from flexround_jax.models import llama  # pylint: disable=g-import-not-at-top
  config = llama.LlamaConfig(**CONFIG)
  specs = {'/'.join(p): (s, np.dtype(ml_dtypes.bfloat16)) for p, s in llama.flax_shapes(config).items()}
  rng = np.random.default_rng(0)

  def tensor(name, shape):   # HF's init: N(0, 0.02) weights, unit norm scales
    if name.endswith('scale'):
      return np.ones(shape, ml_dtypes.bfloat16)
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(ml_dtypes.bfloat16)
  size = weights.write_params(path, specs, ((n, tensor(n, s)) for n, (s, _) in specs.items()),
                              llama.safetensors_metadata(config), overwrite=True)   # a rerun rebuilds it
  return {'file_bytes': size, 'params': int(sum(np.prod(s) for s, _ in specs.values()))}


def _method(fused_grad: bool):
  import flexround_jax as fr  # pylint: disable=g-import-not-at-top
  return fr.methods.flexround(fused_grad=fused_grad)


def quantize(path, workdir, one_layer: bool, iters: int, fused_grad: bool = False):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import flexround_jax as fr  # pylint: disable=g-import-not-at-top
  from flexround_jax.models import llama  # pylint: disable=g-import-not-at-top
  module, params, _ = llama.load_safetensors(path)
  calib = np.random.default_rng(0).integers(0, CONFIG['vocab_size'], (SAMPLES, SEQ)).astype(np.int32)
  rules = [fr.Rule(r'layers_([1-9]|[1-9][0-9])/.*', skip=True)] if one_layer else []
  cfg = fr.QuantConfig(method=_method(fused_grad), weight=fr.QuantSpec(bits=4, granularity='per_channel'),
                       blocks=llama.BLOCK_REGEX, iters=iters, batch_size=BATCH, rules=rules, dry_run=not one_layer,
                       spill_dir=os.path.join(workdir, 'spill'), progress=False)
  result = fr.quantize(params, lambda p, t: module.apply({'params': p}, t), calib, cfg)
  out = {'units': len(result.plan), 'plan_unit0': result.plan[0],
         'peak_state_bytes_planned': max(p['state_bytes'] for p in result.plan),
         'peak_activation_bytes_planned': max(p['activation_bytes'] for p in result.plan)}
  if one_layer:
    rep = result.report[0]
    out.update({k: rep[k] for k in ('unit', 'seconds', 'seconds_train', 'state_bytes_per_device', 'loss_rtn',
                                    'loss_final')})
    out['spilled_kernel_is_memmap'] = isinstance(result.params['layers_0']['mlp']['down_proj']['kernel'], np.memmap)
  return out


def step_memory(path, iters, fused_grad: bool = False):
  """XLA's memory analysis of the compiled FlexRound training step of ``layers_0`` (K = ``iters`` steps per dispatch,
  lowered from shapes alone: nothing is allocated): arguments (state + minibatches), temporaries, outputs."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import flexround_jax as fr  # pylint: disable=g-import-not-at-top
  from flexround_jax import treepath  # pylint: disable=g-import-not-at-top
  from flexround_jax.engine import plan as plan_lib, unit as unit_lib  # pylint: disable=g-import-not-at-top
  from flexround_jax.models import llama  # pylint: disable=g-import-not-at-top
  module, params, config = llama.load_safetensors(path)
  one = llama.LlamaConfig(**{**CONFIG, 'n_layers': 1})   # the first layer alone: planning does not run all 32
  params = {k: v for k, v in params.items() if k in ('embed_tokens', 'norm', 'layers_0')}
  module = llama.Llama(one)
  calib = np.random.default_rng(0).integers(0, CONFIG['vocab_size'], (SAMPLES, SEQ)).astype(np.int32)
  cfg = fr.QuantConfig(method=_method(fused_grad), weight=fr.QuantSpec(bits=4, granularity='per_channel'),
                       blocks=llama.BLOCK_REGEX, iters=iters, batch_size=BATCH, progress=False)
  unit = plan_lib.plan_units(lambda p, t: module.apply({'params': p}, t), params, calib, cfg)[0]
  steps, _ = unit_lib.make_train_step(unit, iters, 0.0)
  unit_params, trainable, frozen, opt_state = unit_lib.state_shapes(
      unit, treepath.get_subtree(params, unit.prefix), iters)
  k = unit_lib.steps_per_dispatch(iters, unit)   # as the run dispatches them
  batch = jax.ShapeDtypeStruct((k, BATCH, SEQ, CONFIG['dim']), np.float32)
  lowered = steps.lower(trainable, opt_state, frozen, unit_params, [batch], [batch],
                        jax.ShapeDtypeStruct((k,), np.float32), jax.eval_shape(lambda: jax.random.key(0)),
                        jax.ShapeDtypeStruct((), np.int32))
  m = lowered.compile().memory_analysis()
  return {'steps_per_dispatch': k,
          **{f'step_{n}_bytes': int(getattr(m, f'{n}_size_in_bytes')) for n in ('argument', 'temp', 'output', 'alias')}}


def checks(path):
  """The value checks planning makes on every leaf of the memory-mapped params (all finite? max |w|?), timed two ways
  in one process over the same pages: numpy's ``isfinite``, ``max`` and ``min`` on the bfloat16 arrays (the engine's
  host path before), and the engine's ``host_finite_and_peak`` (an integer max over the bits, in chunks)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flexround_jax.engine import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from flexround_jax.models import llama  # pylint: disable=g-import-not-at-top
  leaves = [np.asarray(l) for l in jax.tree.leaves(llama.load_safetensors(path)[1])]
  def numpy_path(a):
    return bool(np.isfinite(a).all()), max(abs(np.float32(a.max())), abs(np.float32(a.min())))
  out = {'elements': int(sum(a.size for a in leaves))}
  bits = plan_lib.host_finite_and_peak
  for name, fn in (('bits', bits), ('numpy', numpy_path), ('bits_again', bits)):
    t = time.perf_counter()   # the first pass also brings the file's pages in; 'bits_again' times bits from memory
    results = [fn(a) for a in leaves]
    out[f'{name}_s'] = round(time.perf_counter() - t, 2)
    if name == 'bits':
      first = results
    elif results != first:
      raise AssertionError(f'{name} disagrees with the bits path')
  return out


def phase(name, path, workdir, iters, fused_grad):
  from flexround_jax import provenance  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  with provenance.PeakRSS(every_s=0.05) as rss:
    if name == 'build':
      out = build(path)
    elif name == 'step':
      out = step_memory(path, iters, fused_grad)
    elif name == 'checks':
      out = checks(path)
    else:
      out = quantize(path, workdir, name == 'layer', iters, fused_grad)
  out.update({'commit': provenance.git_commit(), 'wall_s': round(time.time() - t0, 1),
              'peak_rss_mb': round(rss.peak_mb, 1),
              'peak_anon_mb': round(rss.peak_anon_mb, 1)})
  print('RESULT ' + json.dumps(out, default=float), flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', default=os.path.join('work', 'bench_stream'))
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--phases', default='build,dry,layer,step',
                      help='phases to (re)run; the others are kept from an existing JSON')
  parser.add_argument('--fused-grad', action='store_true',
                      help='layer/step phases with flexround(fused_grad=True), stored as <phase>_fused_grad')
  parser.add_argument('--phase', choices=PHASES, help=argparse.SUPPRESS)   # one child process
  args = parser.parse_args()
  path = os.path.join(args.workdir, 'llama7b_bf16.safetensors')
  if args.phase:
    phase(args.phase, path, args.workdir, args.iters, args.fused_grad)
    return
  os.makedirs(args.workdir, exist_ok=True)
  import jax  # pylint: disable=g-import-not-at-top
  out = os.path.join(HERE, 'results', f'stream_7b_{jax.default_backend()}.json')
  results = json.load(open(out)) if os.path.exists(out) else {}
  wanted = args.phases.split(',')
  if set(wanted) - set(PHASES):
    parser.error(f'unknown --phases {sorted(set(wanted) - set(PHASES))}; choose from {PHASES}')
  if args.fused_grad and set(wanted) - {'layer', 'step'}:
    parser.error('--fused-grad applies to the layer and step phases only')
  for name in wanted:
    if name == 'build' and os.path.exists(path):
      continue
    proc = subprocess.run([sys.executable, __file__, '--phase', name, '--workdir', args.workdir,
                           '--iters', str(args.iters)] + ['--fused-grad'] * args.fused_grad,
                          capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
    if proc.returncode or not lines:
      sys.exit(f'phase {name} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    key = name + '_fused_grad' * args.fused_grad
    results[key] = json.loads(lines[-1][len('RESULT '):])
    print(key, json.dumps(results[key]), flush=True)
  from flexround_jax import provenance  # pylint: disable=g-import-not-at-top
  results.update({'model': dict(CONFIG, dtype='bfloat16'), 'calibration': f'{SAMPLES} x {SEQ} random tokens',
                  'batch_size': BATCH, 'iters': args.iters, 'host': provenance.host_info(),
                  'commit': provenance.git_commit(), 'file_bytes': os.path.getsize(path)})
  with open(out, 'w') as f:
    json.dump(results, f, indent=2)
  print('wrote', out)


if __name__ == '__main__':
  main()
