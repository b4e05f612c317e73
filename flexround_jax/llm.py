"""A Hugging Face LLM checkpoint quantized end to end: what ``flexround-jax quantize`` runs.

``quantize_llm(model, out, calib=..., scheme='W4G128', method='flexround', ...)``:
  1. checks every input before any weight is read (``prepare``; each failure an ``InputError`` naming the input):
     the checkpoint's config.json (``models.hf.read_config``), the scheme (``presets``), the method
     (``methods.REGISTRY``; 'gptq+flexround' is ``gptq_flexround``), the export format against the scheme and the
     model's kernel widths, the tokenizer (the checkpoint's tokenizer.json), the calibration text (at least
     ``n_calib * seq_len`` tokens) and ``--eval`` text (at least one window), and ``out`` (new, empty, or a run of the
     same settings);
  2. loads the checkpoint (``models.load_hf``), measures the float perplexity on the ``eval`` windows, quantizes the
     decoder layers (``decoder.BLOCK_REGEX`` blocks; an untied lm_head stays float) with per-block checkpoints in
     ``out/checkpoints``, measures the quantized perplexity on the same windows, and exports.

What ``out`` holds:
  quantize.json       the settings (written first; a rerun with other settings is refused)
  checkpoints/        per-block progress: a rerun of the same command resumes after the last finished block
  quantize_log.jsonl  the engine's log (block starts and ends, training losses)
  jax_cache/          compiled programs (the command only: a rerun skips compiles)
  model/              ``format='compressed-tensors'``: the checkpoint folder vLLM / transformers load
                      (``export.save_compressed_tensors``, scales and unquantized tensors in float32)
  model.safetensors   ``format='native'``: our own format (``export.save_safetensors``; ``export.load_safetensors``)
  results.json        settings, per-block report, wall times, blocks restored from checkpoints, perplexities, export

Calibration and evaluation text are tokenized whole with the checkpoint's tokenizer (no special tokens) and cut into
non-overlapping ``seq_len``-token windows (``evals.perplexity.token_windows``); calibration takes the first
``n_calib``; perplexity scores every window (or the first ``eval_windows``), float and quantized the same ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

SETTINGS_FILE = 'quantize.json'
RESULTS_FILE = 'results.json'
FORMATS = ('compressed-tensors', 'native', 'gguf')
EXPORTS = {'compressed-tensors': 'model', 'native': 'model.safetensors'}   # name of the export inside ``out``
DTYPES = ('float32', 'bfloat16')


class InputError(ValueError):
  """Bad input found before any weight is read (the command prints it as one line and exits with 2)."""


@dataclasses.dataclass(frozen=True)
class Prepared:
  """Everything checked by ``prepare``: ``settings`` (what the run's results depend on; stored in quantize.json),
  the checkpoint's ``decoder_config``, ``tokenizer``, ``calib`` (n_calib, seq_len) int32 windows, ``eval_windows``
  ((N, seq_len) int32 or None), ``qconfig`` (the QuantConfig, checkpoints under ``out``) and ``resume`` (whether
  ``out`` already holds this run)."""
  settings: dict
  model: str
  out: str | None
  format: str
  eval_file: str | None
  decoder_config: Any
  tokenizer: Any
  calib: Any
  eval_windows: Any
  qconfig: Any
  resume: bool


def method_names() -> list[str]:
  """The names ``method`` takes: ``methods.REGISTRY``'s, with '+' for a method started from another's solution."""
  from flexround_jax import methods  # pylint: disable=g-import-not-at-top
  return [n.replace('gptq_', 'gptq+') for n in methods.REGISTRY]


def _method(name: str, scheme, rank: int | None) -> dict:
  """{'name': registry name, knobs} for ``name``: the scheme's learning rate where the method takes one, ``rank``
  where it needs one."""
  from flexround_jax import config_base, methods  # pylint: disable=g-import-not-at-top
  key = name.replace('+', '_') if isinstance(name, str) else name
  if key not in methods.REGISTRY:
    raise InputError(f'unknown method {name!r}; methods: {", ".join(method_names())}')
  knobs = config_base.knobs(methods.REGISTRY[key])
  entry = {'name': key}
  if 'lr' in knobs and 'lr' in scheme.fields['method']:
    entry['lr'] = scheme.fields['method']['lr']
  if 'rank' in knobs:
    if rank is None:
      raise InputError(f'method {name!r} needs --rank (the rank of its low-rank scale matrices)')
    entry['rank'] = rank
  elif rank is not None:
    raise InputError(f'--rank is a knob of lrq and gptq+lrq, not of {name!r}')
  return entry


def _positive(name: str, value, minimum: int = 1):
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise InputError(f'{name} must be an integer >= {minimum}, got {value!r}')


def _text_tokens(path: str, what: str, tokenizer, vocab_size: int):
  """(N,) int32 token ids of a UTF-8 text file, tokenized whole without special tokens."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise InputError(f'{what} {path}: no such file')
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise InputError(f'{what} {path}: not UTF-8 text ({e.reason} at byte {e.start})') from None
  except OSError as e:
    raise InputError(f'{what} {path}: cannot be read ({e.strerror})') from None
  ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)
  if ids.size and int(ids.max()) >= vocab_size:
    raise InputError(f'{what} {path}: the tokenizer gives token id {int(ids.max())}, beyond the model\'s vocab_size '
                     f'{vocab_size} (tokenizer.json does not belong to this checkpoint)')
  return ids


def _stored_settings(out: str) -> dict | None:
  """The settings of the run in ``out`` (None: ``out`` is new or empty); InputError unless ``out`` can be written
  and is new, empty or a run of ours."""
  if os.path.lexists(out) and not os.path.isdir(out):
    raise InputError(f'--out {out}: exists and is not a folder')
  parent = out
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise InputError(f'--out {out}: {parent} is not a folder')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise InputError(f'--out {out}: {parent} is not writable')
  if not os.path.isdir(out) or not os.listdir(out):
    return None
  file = os.path.join(out, SETTINGS_FILE)
  if not os.path.isfile(file):
    raise InputError(f'--out {out}: exists and holds no flexround-jax quantize run (no {SETTINGS_FILE}); give a new '
                     'or empty folder')
  try:
    with open(file, encoding='utf-8') as f:
      stored = json.load(f)['settings']
    if not isinstance(stored, dict):
      raise TypeError('settings is not a JSON object')
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise InputError(f'{file}: not a readable settings file ({e}); give a new or empty --out') from None
  return stored


def _check_same(out: str, stored: dict, settings: dict) -> None:
  """InputError naming every setting where the run in ``out`` differs from this one."""
  differ = {k: (stored.get(k), settings.get(k)) for k in sorted(set(stored) | set(settings))
            if stored.get(k) != settings.get(k)}
  if differ:
    what = '; '.join(f'{k}: {old!r} there, {new!r} now' for k, (old, new) in differ.items())
    raise InputError(f'--out {out}: holds a run with other settings ({what}); rerun it with its own settings to '
                     'resume, or give another --out')


def prepare(model: str, out: str | None, *, calib: str, scheme: str = 'W4G128', method: str = 'flexround',
            n_calib: int = 128, seq_len: int = 512, iters: int = 250, format: str = 'compressed-tensors',
            eval_file: str | None = None, eval_windows: int | None = None, rank: int | None = None,
            batch_size: int | None = None, seed: int = 0, dtype: str = 'float32', progress: bool = True,
            dry_run: bool = False) -> Prepared:
  """Checks every input of ``quantize_llm`` (same arguments) without reading a weight; InputError naming the
  first bad one. ``out`` may be None only with ``dry_run``."""
  from flexround_jax import integrity, presets  # pylint: disable=g-import-not-at-top
  try:
    preset = presets.get(scheme)
  except ValueError as e:
    raise InputError(f'--scheme: {e}') from None
  method_entry = _method(method, preset, rank)
  if format not in FORMATS:
    raise InputError(f'unknown --format {format!r}; formats: {", ".join(FORMATS)}')
  if format == 'gguf':
    raise InputError('--format gguf writes into the source GGUF file (export.save_gguf), and --model is a Hugging '
                     'Face folder; use --format compressed-tensors or native')
  if format == 'compressed-tensors' and preset.fields['activation'] is not None:
    raise InputError(f'--scheme {preset.name} quantizes activations too; compressed-tensors holds weight-only '
                     'models: use --format native or a weight-only scheme')
  for name, value, minimum in (('--n-calib', n_calib, 1), ('--seq-len', seq_len, 2), ('--iters', iters, 1),
                               ('--seed', seed, 0)):
    _positive(name, value, minimum)
  for name, value in (('--eval-windows', eval_windows), ('--batch-size', batch_size), ('--rank', rank)):
    if value is not None:
      _positive(name, value)
  if dtype not in DTYPES:
    raise InputError(f'--dtype must be one of {DTYPES}, got {dtype!r}')
  if eval_windows is not None and eval_file is None:
    raise InputError('--eval-windows needs --eval FILE')
  if out is None and not dry_run:
    raise InputError('--out DIR is required (the folder for results, checkpoints and the export)')

  model = os.path.abspath(os.fspath(model))
  if os.path.isfile(model):
    raise InputError(f'--model {model}: a file; give a Hugging Face checkpoint folder (config.json + safetensors)' +
                     ('; GGUF files are not supported by quantize yet (the SmolLM2 GGUF: flexround-jax run '
                      'configs/smollm2.py)' if model.lower().endswith('.gguf') else ''))
  from flexround_jax.models import decoder, hf  # pylint: disable=g-import-not-at-top
  try:
    config_json, config = hf.read_config(model)
  except ValueError as e:
    raise InputError(f'--model {e}') from None
  weight = preset.fields['weight']
  kernels = {'/'.join(p): s for p, s in hf.param_shapes(config).items() if p[-1] == 'kernel' and p[0] != 'lm_head'}
  if format == 'compressed-tensors' and weight.granularity == 'per_group':
    from flexround_jax.export import grid  # pylint: disable=g-import-not-at-top
    bad = sorted({s[0] for s in kernels.values() if not grid.groups_divide(weight, s[0])})
    if bad:
      raise InputError(f'--scheme {preset.name}: groups of {weight.group_size} do not divide this model\'s kernel '
                       f'inputs {bad}, and compressed-tensors has no shorter last group; use --format native or a '
                       'per-channel scheme (W4)')

  settings = {'model': model, 'model_config_sha256': integrity.json_sha256(config_json),
              'scheme': preset.name, 'method': method_entry, 'calib': os.path.abspath(calib), 'n_calib': n_calib,
              'seq_len': seq_len, 'iters': iters, 'batch_size': batch_size or min(32, n_calib), 'seed': seed,
              'dtype': dtype}
  out = None if out is None else os.path.abspath(os.fspath(out))
  stored = None if out is None else _stored_settings(out)
  tokenizer = hf._tokenizer(model)  # pylint: disable=protected-access
  if tokenizer is None:
    raise InputError(f'--model {model}: has no tokenizer.json (the calibration text is tokenized with the '
                     "checkpoint's own tokenizer)")
  ids = _text_tokens(settings['calib'], '--calib', tokenizer, config.vocab_size)
  need = n_calib * seq_len
  if ids.size < need:
    raise InputError(f'--calib {calib}: {ids.size} tokens, and --n-calib {n_calib} x --seq-len {seq_len} needs '
                     f'{need}')
  from flexround_jax.evals import perplexity  # pylint: disable=g-import-not-at-top
  calib_windows = perplexity.token_windows(ids, seq_len)[:n_calib]
  windows = None
  if eval_file is not None:
    eval_ids = _text_tokens(os.path.abspath(eval_file), '--eval', tokenizer, config.vocab_size)
    windows = perplexity.token_windows(eval_ids, seq_len)[:eval_windows]
    if not len(windows):
      raise InputError(f'--eval {eval_file}: {eval_ids.size} tokens, less than one window of --seq-len {seq_len}')
  settings['calib_sha256'] = integrity.array_digest(calib_windows)['sha256']   # the tokens: text and tokenizer
  if stored is not None:
    _check_same(out, stored, json.loads(json.dumps(settings)))   # as stored: JSON lists and numbers

  from flexround_jax.engine import Rule  # pylint: disable=g-import-not-at-top
  rules = () if config.tie_embeddings else (Rule('lm_head', skip=True),)   # LM heads are kept float, as usual
  try:
    qconfig = presets.preset(preset.name, method=method_entry, blocks=decoder.BLOCK_REGEX, rules=rules, iters=iters,
                             batch_size=settings['batch_size'], seed=seed, progress=progress, dry_run=dry_run,
                             checkpoint_dir=None if out is None else os.path.join(out, 'checkpoints'),
                             log_dir=None if dry_run else out)
  except ValueError as e:
    raise InputError(str(e)) from None
  return Prepared(settings=settings, model=model, out=out, format=format,
                  eval_file=None if eval_file is None else os.path.abspath(eval_file), decoder_config=config,
                  tokenizer=tokenizer, calib=calib_windows, eval_windows=windows, qconfig=qconfig,
                  resume=stored is not None)


def quantize_llm(model: str, out: str | None, *, calib: str, scheme: str = 'W4G128', method: str = 'flexround',
                 n_calib: int = 128, seq_len: int = 512, iters: int = 250, format: str = 'compressed-tensors',
                 eval_file: str | None = None, eval_windows: int | None = None, rank: int | None = None,
                 batch_size: int | None = None, seed: int = 0, dtype: str = 'float32', progress: bool = True,
                 dry_run: bool = False) -> dict:
  """Quantizes the Hugging Face checkpoint folder ``model`` and writes everything to ``out`` (module docstring).

  Args:
    model: checkpoint folder (config.json, safetensors, tokenizer.json) of a family ``models.load_hf`` reads.
    out: the run's folder: new, empty, or an earlier run of the same settings (it resumes there).
    calib: UTF-8 text file; its first ``n_calib`` windows of ``seq_len`` tokens calibrate.
    scheme: a preset (``presets.PRESETS``: W4, W4G128, W3G128, W8A8, W4A8, GGUF-Q4_0).
    method: rtn, adaround, flexround, gptq, lrq, gptq+flexround, gptq+lrq (``methods.REGISTRY``); the scheme's
      learning rate where the method takes one.
    iters, batch_size (default: min(32, n_calib)), seed: the reconstruction budget (``QuantConfig``).
    format: 'compressed-tensors' (weight-only schemes; per-group sizes must divide the kernel inputs) or
      'native'; 'gguf' needs a GGUF source and is refused here.
    eval_file: UTF-8 text file for perplexity (float and quantized, the same windows; ``eval_windows``: the first N).
    rank: lrq's rank (required by lrq and gptq+lrq).
    dtype: the params' dtype while quantizing ('float32' or 'bfloat16').
    progress: tqdm progress bars.
    dry_run: check everything, load the model and print the engine's plan and memory (and, with an existing
      ``out``, where it would resume); quantizes and writes nothing.

  Returns:
    the results dict written to ``out/results.json`` (with ``dry_run``: {'dry_run': True, 'settings', 'plan'}).

  Raises:
    InputError (a ValueError) for bad input, before any weight is read; ValueError from the loader, the engine
    (a checkpoint of another model or data) or the exporter.
  """
  return run(prepare(model, out, calib=calib, scheme=scheme, method=method, n_calib=n_calib, seq_len=seq_len,
                     iters=iters, format=format, eval_file=eval_file, eval_windows=eval_windows, rank=rank,
                     batch_size=batch_size, seed=seed, dtype=dtype, progress=progress, dry_run=dry_run))


def start(job: Prepared) -> None:
  """Makes ``job.out`` a run folder: creates it and writes the settings (quantize.json) unless it is a run being
  resumed. Called by ``run``; call it first to put other files there (the command's jax_cache)."""
  os.makedirs(job.out, exist_ok=True)
  file = os.path.join(job.out, SETTINGS_FILE)
  if not os.path.isfile(file):
    _write_json(file, {'settings': job.settings})


def run(job: Prepared) -> dict:
  """Runs a ``prepare``d job (``quantize_llm``); returns the results dict."""
  t0 = time.time()
  if not job.qconfig.dry_run:
    start(job)
  from flexround_jax import provenance  # pylint: disable=g-import-not-at-top
  from flexround_jax.engine import quantize  # pylint: disable=g-import-not-at-top
  from flexround_jax.models import load_hf  # pylint: disable=g-import-not-at-top
  commit = provenance.git_commit()
  hf_model = load_hf(job.model, job.settings['dtype'])
  if job.qconfig.dry_run:
    return _dry_run(job, hf_model)
  ppl = {}
  if job.eval_windows is not None:
    ppl['float'] = _perplexity(hf_model.apply_fn, hf_model.params, job.eval_windows, job.qconfig.progress)
  t1 = time.time()
  result = quantize(hf_model.params, hf_model.apply_fn, job.calib, job.qconfig)
  quantize_s = time.time() - t1
  if job.eval_windows is not None:
    ppl['quantized'] = _perplexity(result.apply_quantized(hf_model.apply_fn), result.params, job.eval_windows,
                                   job.qconfig.progress)
  export = _export(job, hf_model, result)
  results = {
      'settings': job.settings, 'format': job.format, 'export': export,
      'eval': None if job.eval_file is None else {'file': job.eval_file, 'windows': len(job.eval_windows)},
      'perplexity': ppl or None, 'quantize_wall_s': round(quantize_s, 2), 'total_wall_s': round(time.time() - t0, 2),
      'resumed_units': result.resumed_units,   # blocks restored from checkpoints: quantize_wall_s leaves them out
      'kernels': len(result.qtensors), 'report': result.report, 'commit': commit, 'host': provenance.host_info(),
  }
  _write_json(os.path.join(job.out, RESULTS_FILE), results)
  return results


def _write_json(path: str, value) -> None:
  """``value`` as indented JSON at ``path``, renamed into place so a crash leaves the old file or the new one."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=2, default=float)
  os.replace(tmp, path)


def _perplexity(apply_fn, params, windows, progress: bool) -> dict:
  from flexround_jax.evals import perplexity  # pylint: disable=g-import-not-at-top
  return perplexity.perplexity(apply_fn, params, windows, progress=progress)


def _export(job: Prepared, hf_model, result) -> dict:
  from flexround_jax import export  # pylint: disable=g-import-not-at-top
  path = os.path.join(job.out, EXPORTS[job.format])
  if job.format == 'compressed-tensors':   # a rerun (resume) replaces the export of the run before
    info = export.save_compressed_tensors(path, result.params, result.qtensors, hf_model.config, overwrite=True,
                                          source=hf_model.path)
    info = {'file_bytes': info['file_bytes'], 'copied': info['copied']}
  else:
    info = export.save_safetensors(path, result.params, result.qtensors, result.activations, overwrite=True)
  return {'format': job.format, 'path': path, **info}


def _dry_run(job: Prepared, hf_model) -> dict:
  """The engine's plan (it prints it) and what the run would write; nothing is written."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flexround_jax.engine import quantize  # pylint: disable=g-import-not-at-top
  leaves = jax.tree.leaves(hf_model.params)
  n_params = sum(int(np.prod(np.shape(x))) for x in leaves)
  n_bytes = sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in leaves)
  print(f'model: {job.model} ({job.decoder_config.model_type}, {job.decoder_config.num_layers} layers, '
        f'{n_params:,d} params, {n_bytes / 2**20:.1f} MiB as loaded ({job.settings["dtype"]}))')
  print(f'calibration: {job.settings["n_calib"]} x {job.settings["seq_len"]} tokens'
        + ('' if job.eval_windows is None else f'; perplexity on {len(job.eval_windows)} windows'))
  qconfig = job.qconfig
  if job.out is not None and not job.resume:
    qconfig = dataclasses.replace(qconfig, checkpoint_dir=None)   # nothing to resume from
  result = quantize(hf_model.params, hf_model.apply_fn, job.calib, qconfig)
  if job.out is not None:
    print(f'would write: {os.path.join(job.out, EXPORTS[job.format])} ({job.format}), '
          f'{os.path.join(job.out, RESULTS_FILE)}, checkpoints in {os.path.join(job.out, "checkpoints")}')
  return {'dry_run': True, 'settings': job.settings, 'plan': result.plan}
