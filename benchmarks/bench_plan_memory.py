"""Peak RSS of loading SmolLM2 and planning its 30 layers (a dry run), as before and after the memory changes:
``before``: the params copied to the device all at once and every probe output kept; ``after``: ``weights.to_device``
and the probe as the engine now runs it. Each mode in its own process (an allocator keeps what an earlier phase
freed). Writes benchmarks/results/smollm2_plan_memory.json.

  python benchmarks/bench_plan_memory.py            # both modes, each in a subprocess
"""

import contextlib
import io
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(mode: str) -> dict:
  from flexround_jax import cpu  # pylint: disable=g-import-not-at-top
  cpu.use_all_cores()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import flexround_jax as fr  # pylint: disable=g-import-not-at-top
  from flexround_jax import provenance, weights  # pylint: disable=g-import-not-at-top
  from flexround_jax.engine import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from flexround_jax.evals import perplexity  # pylint: disable=g-import-not-at-top
  from flexround_jax.models import gguf  # pylint: disable=g-import-not-at-top
  with provenance.PeakRSS(every_s=0.05) as rss:
    rss.mark('load')
    model = gguf.load_smollm2()
    params = jax.tree.map(jnp.asarray, model.params) if mode == 'before' else weights.to_device(model.params)
    calib = perplexity.calibration_tokens(128, 512, model.tokenizer)
    apply_fn = model.apply_fn
    del model
    rss.mark('plan')
    if mode == 'before':   # every probe output kept, as planning did before
      plan_lib._inside_a_block = lambda path, blocks: False   # pylint: disable=protected-access
    config = fr.QuantConfig(method=fr.methods.flexround(lr=3e-3), blocks=r'layers_\d+', iters=250, batch_size=2,
                            eval_batch_size=8, dry_run=True, progress=False)
    with contextlib.redirect_stdout(io.StringIO()):
      fr.quantize(params, apply_fn, calib, config)
    rss.mark('end')
  return {'mode': mode, 'peak_rss_mb': rss.phases_mb}


def main():
  if len(sys.argv) > 1:
    print(json.dumps(measure(sys.argv[1])))
    return
  root = os.path.join(HERE, '..')
  rows = []
  for mode in ('before', 'after'):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), mode], cwd=root, capture_output=True, text=True,
                         check=True, env={**os.environ, 'PYTHONPATH': os.path.abspath(root)})
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  from flexround_jax import provenance  # pylint: disable=g-import-not-at-top
  result = {'rows': rows, 'host': {**provenance.host_info(), 'bf16_cpu_flags': provenance.bf16_flags()},
            'commit': provenance.git_commit(),
            'note': 'load: GGUF read, dequantize, device copy, calibration tokens; plan: the dry run of 30 layers'}
  os.makedirs(os.path.join(HERE, 'results'), exist_ok=True)
  with open(os.path.join(HERE, 'results', 'smollm2_plan_memory.json'), 'w') as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  main()
