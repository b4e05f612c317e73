"""The flexround-jax command and its config handling: overrides of any method / activation knob, tasks given by
import path, presets (--scheme), one-line errors for config mistakes, and the demo's per-setting folders."""

import json
import os
import subprocess
import sys
import tomllib

import jax.numpy as jnp
import pytest

from flexround_jax import config_base, demo, run, tasks
from flexround_jax.config_base import ConfigError

import tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_CONFIG = os.path.join(ROOT, 'configs', 'toy_mlp.py')
RESULTS_KEYS = {'task', 'method', 'method_args', 'bits', 'granularity', 'activation', 'group_size', 'iters', 'seed',
                'fp', 'quantized', 'quantize_wall_s', 'total_wall_s', 'resumed_units', 'report', 'notes', 'commit',
                'host'}   # experiments/make_tables.py reads results.json


def make_toy_task(args) -> tasks.Task:
  """A user's task, given as --config.task=test_cli:make_toy_task: tests/tiny_models.py's MLP."""
  params, apply_fn, x = tiny_models.mlp()
  n = args.get('n_calib', 64)
  y_fp = apply_fn(params, x[n:])

  def evaluate(p, forward=None):
    return {'output_mse': float(jnp.mean(((forward or apply_fn)(p, x[n:]) - y_fp) ** 2))}

  return tasks.Task('my_toy', params, apply_fn, x[:n], evaluate, blocks=r'block_\d+')


def not_a_task(args):
  return 3


def _config(*overrides, scheme=None):
  config = run.load_config_file(TOY_CONFIG)
  if scheme:
    config_base.apply_preset(config, scheme)
  config_base.apply_overrides(config, [o.split('=', 1) for o in overrides])
  return config


def test_a_method_knob_the_config_file_does_not_set_can_be_overridden():
  qcfg = config_base.check(_config('quant.method.lr=1e-3', 'quant.method.fused_grad=true'))
  assert qcfg.method.name == 'flexround' and qcfg.method.hparams['lr'] == 1e-3 and qcfg.method.hparams['fused_grad']


@pytest.mark.parametrize('order', [1, -1])
def test_method_name_and_its_knobs_in_any_order(order):
  overrides = ['quant.method.name=adaround', 'quant.method.reg=0.1', 'quant.method.beta=(10, 2)'][::order]
  qcfg = config_base.check(_config(*overrides))
  assert qcfg.method.name == 'adaround' and qcfg.method.hparams['reg'] == 0.1
  assert tuple(qcfg.method.hparams['beta']) == (10, 2)


def test_a_new_method_name_drops_the_files_knobs_and_the_same_name_keeps_them():
  config = run.load_config_file(TOY_CONFIG)
  config.quant.method = {'name': 'lrq', 'rank': 4, 'lr': 2e-3}
  config_base.apply_overrides(config, [('quant.method.name', 'lrq'), ('quant.method.seed', '3')])
  assert config_base.check(config).method.hparams == {'rank': 4, 'lr': 2e-3, 'lr_s1': None, 'seed': 3}
  config_base.apply_overrides(config, [('quant.method.name', 'flexround')])
  assert config_base.check(config).method.hparams['lr'] == 3e-3
  config_base.apply_overrides(config, [('quant.method', 'gptq_flexround'), ('quant.method.damp', '0.1')])
  assert config_base.check(config).method.hparams['gptq']['damp'] == 0.1


def test_activation_quantizer_from_the_command_line():
  qcfg = config_base.check(_config('quant.activation.bits=6', 'quant.activation.name=per_token'))
  assert qcfg.activation.describe() == {'name': 'per_token', 'bits': 6}
  assert config_base.check(_config('quant.activation=None', scheme='W8A8')).activation is None
  qcfg = config_base.check(_config("quant.activation={'name': 'lsq', 'bits': 4}"))
  assert qcfg.activation.describe()['name'] == 'lsq' and qcfg.activation.bits == 4


def test_scheme_then_explicit_overrides_win():
  qcfg = config_base.check(_config('quant.weight.group_size=16', 'quant.method.lr=1e-3', scheme='W4G128'))
  assert qcfg.weight.granularity == 'per_group' and qcfg.weight.group_size == 16 and qcfg.weight.grid_init == 'mse'
  assert qcfg.method.hparams['lr'] == 1e-3 and qcfg.iters == 500
  qcfg = config_base.check(_config('quant.weight.granularity=per_channel', 'quant.weight.group_size=None',
                                   scheme='GGUF-Q4_0'))
  assert qcfg.weight.granularity == 'per_channel' and qcfg.weight.symmetric and qcfg.weight.scale_dtype == 'float16'


@pytest.mark.parametrize('overrides, message', [
    (['quant.method.lrr=1e-3'], "config.quant.method.lrr: method 'flexround' has no knob 'lrr'; its knobs: lr, lr_s1, "
                                'fused_grad'),
    (['quant.method.name=adaround', 'quant.method.rank=3'], "config.quant.method.rank: method 'adaround' has no knob "
                                                             "'rank'; its knobs: lr, reg, beta, warmup"),
    (['quant.method.name=gptq_flexround', 'quant.method.dmp=1'], "config.quant.method.dmp: method 'gptq_flexround' "
     'has no knob .dmp.; its knobs: lr, lr_s1, fused_grad, damp, block_size, act_order, static_groups'),
    (['quant.method.name=lrq'], "config.quant.method.rank: method 'lrq' needs rank"),
    (['quant.method.name=flexrnd'], "config.quant.method.name: unknown method 'flexrnd'; known: rtn, adaround"),
    (['quant.method.lr=-1'], 'config.quant.method: QuantConfig.method: .*lr'),
    (['quant.method=None'], 'config.quant.method: a method is required'),
    (['quant.activation.bits=8'], 'config.quant.activation.bits: set config.quant.activation.name first '
                                  r'\(lsq, per_token\)'),
    (['quant.activation.name=lsq', 'quant.activation.bitz=8'], "config.quant.activation.bitz: activation quantizer "
                                                                "'lsq' has no knob 'bitz'; its knobs: bits, lr, search"),
    (['quant.weight.bits=9'], r'config.quant.weight.bits: QuantSpec.bits must be an integer in 2..8, got 9'),
    (['quant.weight.bitz=3'], 'config.quant.weight.bitz: no such field; config.quant.weight has bits, granularity'),
    (['quant.weight.granularity=per_group'], 'config.quant.weight.group_size: QuantSpec.group_size is required'),
    (['quant.iters=abc'], "config.quant.iters: 'abc' is not a valid int"),
    (['quant.iters=2.5'], "config.quant.iters: '2.5' is not a valid int"),
    (['quant.seed=-1'], 'config.quant.seed: QuantConfig.seed must be a non-negative integer, got -1'),
    (['quant.progress=1'], "config.quant.progress: expected true or false, got '1'"),
    (['quant.blocks=('], r"config.quant.blocks: QuantConfig.blocks '\(' is not a valid regex"),
    (['quant.itres=3'], 'config.quant.itres: no such field; config.quant has act_calib_samples, activation'),
    (['quant.iters.x=3'], 'config.quant.iters.x: config.quant.iters is 500, not a section with fields'),
    (['quant.checkpoint_dir=x'], 'config.quant.checkpoint_dir: set by the runner from --workdir'),
    (["quant.rules=[{'pattern': 'block_0', 'bits': 1}]"], "config.quant.rules: Rule 'block_0': QuantSpec.bits"),
    (['task=nope_pkg.tasks:make'], "config.task: task 'nope_pkg.tasks:make': cannot import module 'nope_pkg.tasks' "
                                   r"\(No module named 'nope_pkg'\)"),
    (['task=test_cli:make_tsk'], "config.task: task 'test_cli:make_tsk': module 'test_cli' has no function "
                                 "'make_tsk'"),
    (['task=toy'], r"config.task: unknown task 'toy'; known tasks: \['gemma3', 'image', 'minilm', 'smollm2', "
                   r"'toy_mlp'\], or an import path 'module:function'"),
    (['task=None'], 'config.task: no task: set config.task to one of'),
])
def test_config_mistakes_are_one_error_naming_the_path(overrides, message):
  with pytest.raises(ConfigError, match=message) as e:
    config_base.check(_config(*overrides))
  assert '\n' not in str(e.value)


def test_task_args_take_new_keys_and_strings_stay_text():
  config = _config('task_args.data_dir=/tmp/x', 'task_args.width=16', 'quant.blocks=12', 'task=toy_mlp')
  assert config.task_args.data_dir == '/tmp/x' and config.task_args.width == 16 and config.task == 'toy_mlp'
  assert config_base.check(config).blocks == '12'   # a string field keeps the text, not the number 12
  with pytest.raises(ConfigError, match='config.task_args.a.b: no such field; config.task_args has'):
    _config('task_args.a.b=1')


def test_tasks_by_import_path():
  assert tasks.resolve('test_cli:make_toy_task') is make_toy_task
  assert tasks.resolve('toy_mlp').__module__ == 'flexround_jax.tasks.toy'
  assert tasks.make('test_cli:make_toy_task', {'n_calib': 32}).calib.shape == (32, 16)
  with pytest.raises(ValueError, match=r"task 'test_cli:not_a_task' returned int, not a flexround_jax.tasks.Task"):
    tasks.make('test_cli:not_a_task', {})


def test_run_command_end_to_end_with_an_own_task_a_knob_and_a_scheme(tmp_path, monkeypatch, capsys):
  from flexround_jax import compile_cache
  monkeypatch.setattr(compile_cache, 'enable', lambda path: path)   # a process-wide JAX setting: not in tests
  workdir = str(tmp_path / 'work')
  rc = run.main(['run', TOY_CONFIG, '--workdir', workdir, '--scheme', 'W4G128',
                 '--config.task=test_cli:make_toy_task',
                 '--config.quant.weight.group_size=16', '--config.quant.method.lr', '1e-3', '--config.quant.iters=3',
                 '--config.task_args.n_calib=64', '--config.quant.batch_size=8', '--config.quant.progress=False'])
  assert rc == 0 and 'wrote ' in capsys.readouterr().out
  results = json.load(open(os.path.join(workdir, 'results.json')))
  assert set(results) == RESULTS_KEYS
  assert results['task'] == 'my_toy' and results['method_args'] == {'lr': 1e-3, 'lr_s1': None}
  assert (results['granularity'], results['group_size'], results['iters']) == ('per_group', 16, 3)
  assert [r['unit'] for r in results['report']][1:3] == ['block_0', 'block_1']


def test_dry_run_and_presets_commands(capsys):
  assert run.main(['dry-run', TOY_CONFIG, '--config.task=test_cli:make_toy_task', '--scheme', 'w4a8']) == 0
  out = capsys.readouterr().out
  assert 'quantization plan: method=flexround(lr=0.003' in out and 'inputs per_token' in out and 'block_1' in out
  assert run.main(['presets']) == 0
  out = capsys.readouterr().out
  for name in ('W4', 'W4G128', 'W3G128', 'W8A8', 'W4A8', 'GGUF-Q4_0'):
    assert f'\n{name} ' in out


@pytest.mark.parametrize('argv, message', [
    (['--config', TOY_CONFIG, '--workdir', 'w', '--config.quant.weight.bits=9'], 'config.quant.weight.bits: '),
    (['run', TOY_CONFIG, '--workdir', 'w', '--scheme', 'W5'], "--scheme: unknown preset 'W5'; presets: W4,"),
    (['run', 'missing.py', '--workdir', 'w'], 'missing.py: no such config file'),
    (['run', '--workdir', 'w'], 'no config file: flexround-jax run CONFIG'),
    (['run', os.path.join(ROOT, 'flexround_jax', 'cpu.py'), '--workdir', 'w'],
     f"{os.path.join(ROOT, 'flexround_jax', 'cpu.py')}: not a config file (it defines no get_config())"),
    (['run', TOY_CONFIG, '--config', TOY_CONFIG, '--workdir', 'w'], 'two config files'),
    (['run', TOY_CONFIG, '--workdir', 'w', '--config.quant.iters'], r'--config.quant.iters: no value'),
])
def test_command_line_mistakes_exit_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert run.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'flexround-jax: error: {message}') and err.count('\n') == 1
  assert not os.path.exists(tmp_path / 'w')


def test_module_form_and_help_in_a_subprocess(tmp_path):
  def cli(*args):
    return subprocess.run([sys.executable, '-m', 'flexround_jax.run', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  out = cli('--config', TOY_CONFIG, '--workdir', str(tmp_path), '--config.quant.method.lr=1e-3',
            '--config.quant.method.lrr=1')
  assert out.returncode == 2 and out.stderr == ("flexround-jax: error: config.quant.method.lrr: method 'flexround' "
                                                "has no knob 'lrr'; its knobs: lr, lr_s1, fused_grad\n")
  out = cli('--help')
  assert out.returncode == 0 and 'dry-run' in out.stdout and 'presets' in out.stdout
  out = cli('run', '--help')
  assert out.returncode == 0 and '--config.quant.method.lr=1e-3' in out.stdout and '--scheme' in out.stdout


def test_console_script_entry_point():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    entry = tomllib.load(f)['project']['scripts']['flexround-jax']
  module, fn = entry.split(':')
  assert (module, fn) == ('flexround_jax.run', 'main') and callable(run.main)


def test_each_demo_setting_has_its_own_folder(tmp_path):
  default = demo._config('minilm', 'flexround', None, None).quant
  assert (default.weight.bits, default.iters) == (4, 250)
  three = demo._config('minilm', 'flexround', 3, None).quant
  base = str(tmp_path)
  dirs = {demo.settings_dir(base, 'minilm', q.weight.bits, q.iters) for q in (default, three)}
  assert dirs == {os.path.join(base, 'minilm_W4_250iters'), os.path.join(base, 'minilm_W3_250iters')}
  assert demo.settings_dir(base, 'minilm', 4, 250) == demo.settings_dir(base + '/', 'minilm', 4, 250)
  assert demo.settings_dir(base, 'minilm', 4, 100) != demo.settings_dir(base, 'minilm', 4, 250)
