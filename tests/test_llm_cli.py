"""``flexround-jax quantize`` (``llm.quantize_llm``) on a tiny Hugging Face fixture checkpoint: end to end
(results.json, the compressed-tensors export read back to the perplexity the run reported), a run SIGKILLed after
its first block and rerun (it resumes and exports exactly what an uninterrupted run exports), the native export
round trip, ``--dry-run`` (plan and memory, nothing written) and the one-line errors for bad input, given before any
weight is read."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flexround_jax import export, llm, run
from flexround_jax.evals import perplexity
from flexround_jax.models import load_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'hf', 'llama')   # 2 layers, width 48, vocab 256, untied lm_head
N_CALIB, SEQ_LEN, ITERS = 8, 16, 100
KERNELS = ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'mlp.gate_proj',
           'mlp.up_proj', 'mlp.down_proj')
ENV = {**os.environ, 'PYTHONPATH': ROOT, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """A copy of the llama fixture with a word-level tokenizer.json trained on the calibration text (the fixtures
  carry no tokenizer), that text (1,500 words) and an evaluation text."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.mktemp('llm_cli')
  rng = np.random.default_rng(0)
  words = [''.join(rng.choice(list('abcdefghij'), size=rng.integers(2, 6))) for _ in range(120)]
  calib = ' '.join(rng.choice(words, size=1500))
  evaluation = ' '.join(rng.choice(words, size=200))
  model = base / 'model'
  shutil.copytree(FIXTURE, model, ignore=shutil.ignore_patterns('reference.npz'))
  tokenizer = Tokenizer(models.WordLevel(unk_token='[UNK]'))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.train_from_iterator([calib], trainers.WordLevelTrainer(vocab_size=200, special_tokens=['[UNK]']))
  tokenizer.save(str(model / 'tokenizer.json'))
  (base / 'calib.txt').write_text(calib)
  (base / 'eval.txt').write_text(evaluation)
  return {'model': str(model), 'calib': str(base / 'calib.txt'), 'eval': str(base / 'eval.txt'), 'base': base}


def _args(files, out, *extra):
  return ['quantize', '--model', files['model'], '--scheme', 'W4', '--method', 'flexround', '--calib', files['calib'],
          '--n-calib', str(N_CALIB), '--seq-len', str(SEQ_LEN), '--iters', str(ITERS), '--out', str(out),
          '--eval', files['eval'], *extra]


def _command(files, out, *extra):
  return [sys.executable, '-m', 'flexround_jax.run', *_args(files, out, *extra)]


@pytest.fixture(scope='module')
def uninterrupted(files):
  """One run of the command, start to end, in its own process (as a user runs it)."""
  out = files['base'] / 'out'
  proc = subprocess.run(_command(files, out), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return out, proc


def _unpack(words: np.ndarray, bits: int, count: int) -> np.ndarray:
  """compressed-tensors' int32 packing undone: (rows, words) -> (rows, count) unsigned values."""
  rows = words.shape[0]
  stream = np.unpackbits(np.ascontiguousarray(words.astype('<i4')).view(np.uint8).reshape(rows, -1), axis=-1,
                         bitorder='little')
  values = stream[:, :count * bits].reshape(rows, count, bits).astype(np.int64)
  return values @ (1 << np.arange(bits))


def _decoded_params(folder: str, like):
  """The params of a W4 per-channel compressed-tensors export, every projection decoded from its packed codes."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(os.path.join(folder, 'model.safetensors'))
  params = jax.tree.map(lambda x: x, like)   # new dicts, the same leaves
  for i in range(2):
    for name in KERNELS:
      hf = f'model.layers.{i}.{name}'
      n_out, n_in = tensors[f'{hf}.weight_shape']
      codes = _unpack(tensors[f'{hf}.weight_packed'], 4, n_in)                     # (out, in)
      zero_point = _unpack(tensors[f'{hf}.weight_zero_point'].T, 4, n_out).T      # (out, 1)
      weight = tensors[f'{hf}.weight_scale'] * (codes - zero_point).astype(np.float32)
      group, proj = name.split('.')
      params[f'layers_{i}']['attn' if group == 'self_attn' else 'mlp'][proj] = {'kernel': weight.T}
  return params


def test_quantize_end_to_end_writes_results_and_an_export_that_reads_back(files, uninterrupted):
  out, proc = uninterrupted
  results = json.loads((out / 'results.json').read_text())
  assert results['settings']['scheme'] == 'W4' and results['settings']['method'] == {'name': 'flexround', 'lr': 3e-3}
  assert results['resumed_units'] == 0 and results['kernels'] == 14   # 2 layers x 7 projections; lm_head float
  assert [r['unit'] for r in results['report']] == ['layers_0', 'layers_1']
  assert all(r['iters'] == ITERS and np.isfinite(r['loss_final']) for r in results['report'])
  ppl = results['perplexity']
  assert ppl['float']['n_windows'] == ppl['quantized']['n_windows'] == results['eval']['windows'] > 0
  assert results['quantize_wall_s'] > 0 and results['export']['format'] == 'compressed-tensors'
  assert 'flexround layers_1' in proc.stderr   # the engine's progress bars
  assert 'wrote' in proc.stdout

  folder = out / 'model'
  config = json.loads((folder / 'config.json').read_text())
  assert config['quantization_config']['format'] == 'pack-quantized' and config['quantization_config']['ignore'] == \
      ['lm_head']
  assert sorted(os.listdir(folder)) == ['config.json', 'generation_config.json', 'model.safetensors',
                                        'tokenizer.json']
  # The export decoded by hand gives the perplexity the run measured on its fake-quantized model.
  model = load_hf(files['model'])
  params = _decoded_params(str(folder), model.params)
  windows = perplexity.token_windows(
      model.tokenizer.encode((files['base'] / 'eval.txt').read_text(), add_special_tokens=False).ids, SEQ_LEN)
  got = perplexity.perplexity(model.apply_fn, params, windows, progress=False)
  np.testing.assert_allclose(got['ppl'], ppl['quantized']['ppl'], rtol=1e-5)


def test_a_run_killed_after_its_first_block_resumes_and_exports_the_same_model(files, uninterrupted):
  """SIGKILL once layers_0 is checkpointed (the log shows layers_1 starting); the same command again restores
  layers_0 and writes tensor for tensor the uninterrupted run's export."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  out = files['base'] / 'killed'
  proc = subprocess.Popen(_command(files, out, '--no-progress'), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  log = out / 'quantize_log.jsonl'
  killed, deadline = False, time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if log.exists():
      events = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
      if any(e['event'] == 'unit_start' and e['unit'] == 'layers_1' for e in events):
        proc.send_signal(signal.SIGKILL)
        killed = True
        break
    time.sleep(0.02)
  proc.wait(timeout=60)
  assert killed, f'the run ended before it could be killed: {proc.stderr.read()[-2000:]}'
  assert not (out / 'results.json').exists() and os.path.isdir(out / 'checkpoints')

  rerun = subprocess.run(_command(files, out, '--no-progress'), env=ENV, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-4000:]
  assert 'resuming' in rerun.stdout
  results = json.loads((out / 'results.json').read_text())
  assert results['resumed_units'] == 1
  want = json.loads((uninterrupted[0] / 'results.json').read_text())
  assert results['perplexity'] == want['perplexity']
  a = load_file(str(out / 'model' / 'model.safetensors'))
  b = load_file(str(uninterrupted[0] / 'model' / 'model.safetensors'))
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_native_format_round_trip(files, tmp_path):
  """--format native: our safetensors file loads back (verified) to the params the run evaluated."""
  out = tmp_path / 'native'
  results = llm.quantize_llm(files['model'], str(out), calib=files['calib'], scheme='W4', method='rtn',
                             n_calib=N_CALIB, seq_len=SEQ_LEN, iters=1, format='native', eval_file=files['eval'],
                             progress=False)
  assert results['export']['path'] == str(out / 'model.safetensors')
  params, qtensors = export.load_safetensors(str(out / 'model.safetensors'))
  assert len(qtensors) == 14 and 'lm_head/kernel' not in qtensors
  model = load_hf(files['model'])
  windows = perplexity.token_windows(
      model.tokenizer.encode((files['base'] / 'eval.txt').read_text(), add_special_tokens=False).ids, SEQ_LEN)
  got = perplexity.perplexity(model.apply_fn, params, windows, progress=False)
  assert got == results['perplexity']['quantized']


def test_dry_run_prints_the_plan_and_writes_nothing(files, tmp_path, capsys):
  out = tmp_path / 'dry'
  assert run.main(_args(files, out, '--dry-run')) == 0
  printed = capsys.readouterr().out
  assert 'quantization plan' in printed and 'layers_1' in printed and 'peak training state' in printed
  assert 'MiB as loaded' in printed and 'would write' in printed
  assert not out.exists()


def test_help_and_imports_without_jax():
  code = ('import sys, flexround_jax.run, flexround_jax.llm; assert "jax" not in sys.modules; '
          'sys.argv = ["flexround-jax", "quantize", "--help"]; flexround_jax.run.main()')
  proc = subprocess.run([sys.executable, '-c', code], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for flag in ('--model', '--scheme', '--method', '--calib', '--n-calib', '--seq-len', '--iters', '--out', '--format',
               '--eval', '--dry-run'):
    assert flag in proc.stdout


def _error(files, capsys, argv) -> str:
  code = run.main(argv)
  err = capsys.readouterr().err
  assert code == 2 and err.count('\n') == 1 and 'Traceback' not in err, err
  return err


def test_a_folder_without_config_json_is_one_line(files, tmp_path, capsys):
  argv = _args(files, tmp_path / 'out')
  argv[argv.index('--model') + 1] = str(tmp_path)
  assert 'has no config.json' in _error(files, capsys, argv)


def test_an_unknown_scheme_lists_the_schemes(files, tmp_path, capsys):
  argv = _args(files, tmp_path / 'out')
  argv[argv.index('--scheme') + 1] = 'W5G7'
  err = _error(files, capsys, argv)
  assert "unknown preset 'W5G7'" in err and 'W4G128' in err


def test_an_unknown_method_lists_the_methods(files, tmp_path, capsys):
  argv = _args(files, tmp_path / 'out')
  argv[argv.index('--method') + 1] = 'flexroundd'
  err = _error(files, capsys, argv)
  assert "unknown method 'flexroundd'" in err and 'gptq+flexround' in err


def test_a_calibration_file_too_short_says_how_many_tokens(files, tmp_path, capsys):
  argv = _args(files, tmp_path / 'out')
  argv[argv.index('--n-calib') + 1] = '1000'
  assert '1500 tokens, and --n-calib 1000 x --seq-len 16 needs 16000' in _error(files, capsys, argv)


def test_out_that_is_not_a_run_folder_is_refused(files, tmp_path, capsys):
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'notes.txt').write_text('mine')
  assert 'holds no flexround-jax quantize run' in _error(files, capsys, _args(files, tmp_path / 'other'))
  (tmp_path / 'file').write_text('')
  assert 'is not a folder' in _error(files, capsys, _args(files, tmp_path / 'file' / 'out'))


def test_out_of_a_run_with_other_settings_is_refused(files, uninterrupted, capsys):
  argv = _args(files, uninterrupted[0])
  argv[argv.index('--iters') + 1] = str(ITERS + 1)
  assert f'iters: {ITERS} there, {ITERS + 1} now' in _error(files, capsys, argv)


def test_a_checkpoint_without_tokenizer_and_a_grid_the_export_cannot_hold(files, tmp_path, capsys):
  argv = _args(files, tmp_path / 'out')
  argv[argv.index('--model') + 1] = FIXTURE
  assert 'has no tokenizer.json' in _error(files, capsys, argv)
  argv = _args(files, tmp_path / 'out')
  argv[argv.index('--scheme') + 1] = 'W4G128'
  assert 'groups of 128 do not divide' in _error(files, capsys, argv)
