"""Packaging: optional dependencies load on first use, a missing one names its extra, and pyproject.toml, the
``require`` calls and constraints.txt agree."""

import ast
import glob
import os
import re
import subprocess
import sys
import textwrap
import tomllib

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from flexround_jax import _extras

ROOT = os.path.join(os.path.dirname(__file__), '..')
with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as _f:
  PYPROJECT = tomllib.load(_f)['project']
EXTRAS = PYPROJECT['optional-dependencies']
OPTIONAL_MODULES = ('matplotlib', 'tensorflow_datasets', 'gensim', 'gguf', 'tokenizers', 'qwix', 'scipy.stats')


def _names(requirements) -> set[str]:
  return {canonicalize_name(Requirement(r).name) for r in requirements}


def _require_calls() -> list[tuple[str, str, str]]:
  """(file, module, extra) of every ``_extras.require`` / ``_extras.missing`` call in the package."""
  calls = []
  for path in glob.glob(os.path.join(ROOT, 'flexround_jax', '**', '*.py'), recursive=True):
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      func = node.func if isinstance(node, ast.Call) else None
      if (isinstance(func, ast.Attribute) and func.attr in ('require', 'missing') and isinstance(func.value, ast.Name)
          and func.value.id == '_extras'):
        module, extra = (ast.literal_eval(a) for a in node.args[:2])
        calls.append((os.path.relpath(path, ROOT), module, extra))
  return calls


def test_every_require_names_an_extra_that_installs_the_module():
  calls = _require_calls()
  assert {extra for _, _, extra in calls} >= {'data', 'llm', 'plots', 'qwix'}
  for path, module, extra in calls:
    top = module.split('.')[0]
    dist = canonicalize_name(_extras.DISTRIBUTIONS.get(top, top))
    assert extra in EXTRAS, f'{path}: extra {extra!r} is not in pyproject.toml'
    assert dist in _names(EXTRAS[extra]), f'{path}: {dist} is not in the {extra!r} extra'


def test_all_holds_every_user_extra():
  (req,) = EXTRAS['all']
  assert Requirement(req).extras == set(EXTRAS) - {'all', 'deploy', 'docs', 'peers', 'test'}


def test_constraints_pin_every_dependency_within_its_range():
  pins = {}
  with open(os.path.join(ROOT, 'constraints.txt'), encoding='utf-8') as f:
    for line in f:
      if line.strip() and not line.startswith('#'):
        name, version = line.strip().split('==')
        pins[canonicalize_name(name)] = version
  # deploy and peers (torch, auto-round) are installed beside .venv's tested set, not pinned with it.
  groups = {'core': PYPROJECT['dependencies'],
            **{k: v for k, v in EXTRAS.items() if k not in ('all', 'deploy', 'peers')}}
  for group, requirements in groups.items():
    for r in map(Requirement, requirements):
      name = canonicalize_name(r.name)
      assert name in pins, f'{group}: {name} has no exact version in constraints.txt'
      assert r.specifier.contains(pins[name], prereleases=True), f'{group}: {name}=={pins[name]} outside {r.specifier}'


def test_version_is_single_sourced():
  import flexround_jax  # pylint: disable=g-import-not-at-top
  assert 'version' in PYPROJECT['dynamic'] and 'version' not in PYPROJECT
  assert re.fullmatch(r'\d+\.\d+\.\d+', flexround_jax.__version__)


@pytest.mark.parametrize('absent', ['matplotlib', 'matplotlib.pyplot'])
def test_missing_module_names_its_extra(absent, monkeypatch):
  monkeypatch.delitem(sys.modules, 'matplotlib.pyplot', raising=False)
  monkeypatch.setitem(sys.modules, absent, None)   # import raises ModuleNotFoundError, as when not installed
  message = "matplotlib is not installed; it comes with the 'plots' extra: pip install 'flexround_jax[plots]'"
  with pytest.raises(ImportError, match=re.escape(message)):
    _extras.require('matplotlib.pyplot', 'plots')


def test_library_functions_name_their_extra(monkeypatch):
  from flexround_jax import plots  # pylint: disable=g-import-not-at-top
  from flexround_jax.export import gguf as gguf_export  # pylint: disable=g-import-not-at-top
  from flexround_jax.evals import word_similarity  # pylint: disable=g-import-not-at-top
  for module in ('matplotlib', 'matplotlib.pyplot', 'scipy.stats', 'gguf'):
    monkeypatch.setitem(sys.modules, module, None)
  with pytest.raises(ModuleNotFoundError, match=re.escape("pip install 'flexround_jax[plots]'")):
    plots.loss_curves([])
  with pytest.raises(ModuleNotFoundError, match=re.escape("pip install 'flexround_jax[data]'")):
    word_similarity.spearman({'a': np.ones(2), 'b': np.ones(2)}, [('a', 'b')], np.ones(1))
  with pytest.raises(ModuleNotFoundError, match=re.escape("pip install 'flexround_jax[llm]'")):
    gguf_export._quant_types()   # pylint: disable=protected-access


def test_error_inside_an_installed_package_is_not_renamed(tmp_path, monkeypatch):
  (tmp_path / 'pkg_with_broken_dep.py').write_text('import no_such_module_flexround_test\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ModuleNotFoundError) as info:
    _extras.require('pkg_with_broken_dep', 'data')
  assert info.value.name == 'no_such_module_flexround_test' and 'flexround_jax[' not in str(info.value)


def test_library_imports_no_optional_dependency_and_sets_no_backend():
  code = textwrap.dedent(f'''
      import sys
      import flexround_jax as fr
      fr.quantize
      from flexround_jax import export, plots, run, weights
      from flexround_jax.export import compressed_tensors, gguf, grid, native, qwix
      from flexround_jax.data import fashion_mnist, sentences, wiki
      from flexround_jax.evals import perplexity, word_similarity
      from flexround_jax.tasks import image, minilm, smollm2
      loaded = [m for m in {OPTIONAL_MODULES!r} if m in sys.modules]
      assert not loaded, loaded
      ''')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT, timeout=300)


def test_runner_without_matplotlib_writes_results_but_no_plots(tmp_path, monkeypatch):
  from flexround_jax import run  # pylint: disable=g-import-not-at-top
  for module in ('matplotlib', 'matplotlib.pyplot'):
    monkeypatch.setitem(sys.modules, module, None)
  config = run.load_config_file(os.path.join(ROOT, 'configs', 'toy_mlp.py'))
  config.quant.iters = 5
  config.task_args.n_calib = 64
  run.run(config, str(tmp_path))
  assert (tmp_path / 'results.json').exists() and (tmp_path / 'quantized').is_dir()
  assert not list(tmp_path.glob('*.png'))
