"""Every file we write is verified on load: safetensors and Orbax exports, per-unit checkpoints, GGUF inputs.

A changed byte, field or tensor is a ValueError naming the file (and the field), never a silently different model;
the fuzz tests flip single bytes and accept only 'identical' or 'ValueError naming the file'.
"""

import dataclasses
import json
import os
import re
import shutil
import warnings

import jax
import ml_dtypes
import numpy as np
import pytest

from flexround_jax import _layout, export, integrity, qtensor, treepath
from flexround_jax.export import native
from flexround_jax.engine import checkpoint
from flexround_jax.qtensor import QTensor
from flexround_jax.spec import QuantSpec

import tiny_gguf


# -------------------------------------------------------------------------------------------------- small model ----

def _qtensor(rng, view, spec):
  lo, hi = spec.code_range
  grid = _layout.grid_shape(view, spec)
  zero_point = (np.zeros(grid, np.int32) if spec.symmetric
                else rng.integers(0, 2 ** spec.bits, grid).astype(np.int32))
  return QTensor(codes=rng.integers(lo, hi + 1, view).astype(qtensor.code_dtype(spec)),
                 scale=rng.uniform(0.01, 0.1, grid).astype(np.float32), zero_point=zero_point, spec=spec)


def _model(seed=0):
  """(params, qtensors): per-group, per-channel symmetric, per-tensor 3-D (2-D view) and bfloat16 kernels."""
  rng = np.random.default_rng(seed)
  kernels = {  # name: (kernel shape, dtype, view, spec)
      'dense/kernel': ((16, 8), np.float32, (16, 8), QuantSpec(bits=4, granularity='per_group', group_size=8)),
      'conv/kernel': ((3, 3, 4, 8), np.float32, (3, 3, 4, 8), QuantSpec(bits=3, symmetric=True)),
      'attn/kernel': ((4, 2, 8), np.float32, (8, 8), QuantSpec(bits=8, granularity='per_tensor')),
      'head/kernel': ((8, 4), ml_dtypes.bfloat16, (8, 4), QuantSpec(bits=2, grid_init='mse')),
  }
  params, qtensors = {}, {}
  for name, (shape, dtype, view, spec) in kernels.items():
    qtensors[name] = _qtensor(rng, view, spec)
    params[name] = np.asarray(qtensors[name].dequantize(dtype)).reshape(shape)
  params['dense/bias'] = rng.normal(size=8).astype(np.float32)
  params['norm/scale'] = rng.normal(size=8).astype(ml_dtypes.bfloat16)
  return treepath.unflatten(params), qtensors


def _assert_same(params, qtensors, want_params, want_qtensors):
  """Bit-equal: same names, dtypes, shapes and bytes; QTensors with equal specs."""
  got, want = treepath.flatten(params), treepath.flatten(want_params)
  assert sorted(got) == sorted(want)
  for name in want:
    assert integrity.array_digest(got[name]) == integrity.array_digest(want[name]), name
  assert sorted(qtensors) == sorted(want_qtensors)
  for name, qt in want_qtensors.items():
    assert qtensors[name].spec == qt.spec
    for field in ('codes', 'scale', 'zero_point'):
      assert integrity.array_digest(getattr(qtensors[name], field)) == integrity.array_digest(getattr(qt, field))


def _is_same(params, qtensors, want_params, want_qtensors) -> bool:
  try:
    _assert_same(params, qtensors, want_params, want_qtensors)
    return True
  except AssertionError:
    return False


# -------------------------------------------------------------------------------------------------- safetensors ----

def test_safetensors_round_trip_keeps_dtypes_and_bits(tmp_path):
  params, qtensors = _model()
  path = str(tmp_path / 'm.safetensors')
  export.save_safetensors(path, params, qtensors)
  loaded, loaded_q = export.load_safetensors(path)
  _assert_same(loaded, loaded_q, params, qtensors)
  assert loaded['norm']['scale'].dtype == ml_dtypes.bfloat16 and loaded['head']['kernel'].dtype == ml_dtypes.bfloat16


def _replace_in_file(path, old: bytes, new: bytes):
  data = open(path, 'rb').read()
  assert data.count(old) == 1, (old, data.count(old))
  open(path, 'wb').write(data.replace(old, new))


def test_save_safetensors_refuses_an_existing_file_and_replaces_it_atomically(tmp_path, monkeypatch):
  from safetensors.numpy import save_file
  path = str(tmp_path / 'model.safetensors')
  save_file({'w': np.ones((2, 2), np.float32)}, path)   # a user's float model, not an export
  before = open(path, 'rb').read()
  params, qtensors = _model()
  with pytest.raises(FileExistsError, match=re.escape(path) + '.*overwrite=True'):
    export.save_safetensors(path, params, qtensors)
  assert open(path, 'rb').read() == before

  def crash(tensors, filename, metadata=None):   # dies after writing part of the new file
    open(filename, 'wb').write(b'partial')
    raise RuntimeError('disk full')
  with monkeypatch.context() as m:
    m.setattr('safetensors.numpy.save_file', crash)
    with pytest.raises(RuntimeError, match='disk full'):
      export.save_safetensors(path, params, qtensors, overwrite=True)
  assert open(path, 'rb').read() == before

  export.save_safetensors(path, params, qtensors, overwrite=True)
  _assert_same(*export.load_safetensors(path), params, qtensors)
  assert sorted(os.listdir(tmp_path)) == ['model.safetensors']   # no temporary or old copy left behind
  os.makedirs(tmp_path / 'folder' / 'inside')
  with pytest.raises(FileExistsError, match=re.escape(str(tmp_path / 'folder')) + ' is a folder'):
    export.save_safetensors(str(tmp_path / 'folder'), params, qtensors, overwrite=True)
  assert os.path.isdir(tmp_path / 'folder' / 'inside')


def test_loads_return_a_documented_named_tuple(tmp_path):
  params, qtensors = _model()
  export.save_safetensors(str(tmp_path / 'q.safetensors'), params, qtensors)
  export.save_orbax(str(tmp_path / 'q'), _Result(params, qtensors))
  for loaded in (export.load_safetensors(str(tmp_path / 'q.safetensors')), export.load_orbax(str(tmp_path / 'q'))):
    assert isinstance(loaded, export.Loaded) and loaded._fields == ('params', 'qtensors')
    _assert_same(loaded.params, loaded.qtensors, params, qtensors)


def test_group_size_flip_in_the_metadata_is_an_error(tmp_path):
  """group_size 8 -> 9 keeps 2 groups on 16 inputs: every shape still fits, only the checksum can tell."""
  params, qtensors = _model()
  path = str(tmp_path / 'm.safetensors')
  export.save_safetensors(path, params, qtensors)
  _replace_in_file(path, b'\\"group_size\\": 8', b'\\"group_size\\": 9')
  with pytest.raises(ValueError, match=re.escape(path) + '.*checksum'):
    export.load_safetensors(path)


def _write(path, tensors, info, fmt=export.FORMAT):
  """A file as a (buggy) writer would make it: any tensors and metadata, with a matching checksum."""
  from safetensors.numpy import save_file
  info = {**info, 'format': fmt}
  sha = native._checksum(tensors, info) if fmt == export.FORMAT else native._checksum_1(tensors)
  save_file(tensors, path, metadata={'flexround_jax': json.dumps(info), 'sha256': sha})


def _parts(path):
  """(tensors, info) of a good export."""
  from safetensors import safe_open
  with safe_open(path, framework='numpy') as f:
    return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()['flexround_jax'])


def _legacy(tensors, info):
  """The same model as the '/1' writer wrote it: no params list, no kernel dtype (float32 kernels only)."""
  info = {'kernels': {n: {k: v for k, v in e.items() if k != 'dtype'} for n, e in info['kernels'].items()
                      if e['dtype'] == 'float32'}}
  tensors = {n: t for n, t in tensors.items() if not n.startswith('head/')}
  return tensors, info


def _edit_kernel(name, **fields):
  def edit(tensors, info):
    info['kernels'][name].update(fields)
  return edit


def _set_tensor(name, value):
  def edit(tensors, info):
    tensors[name] = value
  return edit


def _drop_tensor(name):
  def edit(tensors, info):
    del tensors[name]
  return edit


# (edit of (tensors, info), expected message); 'dense/kernel' is 4-bit per-group (16, 8), 'conv/kernel' symmetric.
DAMAGE = {
    'shape_vs_view': (_edit_kernel('dense/kernel', shape=[16, 9]), r"kernel 'dense/kernel'.*view"),
    'bits_invalid': (_edit_kernel('dense/kernel', bits=9), r"kernel 'dense/kernel'.*QuantSpec.bits"),
    'granularity_invalid': (_edit_kernel('dense/kernel', granularity='per_row'), r"dense/kernel'.*granularity"),
    'bits_changed': (_edit_kernel('dense/kernel', bits=3), r"kernel 'dense/kernel'.*qweight must be 48 uint8"),
    'field_missing': (lambda t, i: i['kernels']['dense/kernel'].pop('view'), r"kernel 'dense/kernel'.*fields"),
    'shape_not_ints': (_edit_kernel('dense/kernel', shape='16x8'), r"kernel 'dense/kernel': shape must be a list"),
    'group_size_changes_grid': (_edit_kernel('dense/kernel', group_size=4), r"dense/kernel'.*scale.*grid shape"),
    'qweight_dtype': (lambda t, i: t.update({'dense/kernel.qweight': t['dense/kernel.qweight'].view(np.int8)}),
                      r"kernel 'dense/kernel'.*qweight must be 64 uint8"),
    'qweight_short': (lambda t, i: t.update({'dense/kernel.qweight': t['dense/kernel.qweight'][:-1]}),
                      r"kernel 'dense/kernel'.*qweight"),
    'scale_shape': (_set_tensor('dense/kernel.scale', np.ones((1, 8), np.float32)), r"dense/kernel'.*scale.*grid"),
    'scale_dtype': (_set_tensor('conv/kernel.scale', np.ones((1, 1, 1, 8), np.float64)), r"conv/kernel'.*scale"),
    'scale_nan': (_set_tensor('conv/kernel.scale', np.full((1, 1, 1, 8), np.nan, np.float32)), r'finite and > 0'),
    'scale_zero': (_set_tensor('conv/kernel.scale', np.zeros((1, 1, 1, 8), np.float32)), r'finite and > 0'),
    'zero_point_range': (_set_tensor('dense/kernel.zero_point', np.full((2, 8), 16, np.int32)),
                         r"dense/kernel'.*zero_point spans \[16, 16\].*\[0, 15\]"),
    'zero_point_symmetric': (_set_tensor('conv/kernel.zero_point', np.ones((1, 1, 1, 8), np.int32)),
                             r"conv/kernel'.*zero_point.*\[0, 0\]"),
    'zero_point_dtype': (lambda t, i: t.update({'dense/kernel.zero_point': t['dense/kernel.zero_point'] * 1.0}),
                         r"dense/kernel'.*zero_point must be int32"),
    'scale_missing': (_drop_tensor('dense/kernel.scale'), r"kernel 'dense/kernel': tensor dense/kernel.scale is miss"),
    'stray_qweight': (lambda t, i: t.update({'extra/kernel.qweight': np.zeros(4, np.uint8)}),
                      r"'extra/kernel.qweight' is (not part of any kernel|neither a listed param)"),
    'kernel_unlisted': (lambda t, i: i['kernels'].pop('dense/kernel'), r"'dense/kernel.qweight' is"),
}
DAMAGE_2 = {  # fields only '/2' files have
    'param_unlisted': (lambda t, i: t.update({'extra': np.zeros(2, np.float32)}), r"tensor 'extra' is neither"),
    'param_missing': (_drop_tensor('dense/bias'), r"param 'dense/bias' listed in the metadata is missing"),
    'param_dtype': (lambda t, i: t.update({'dense/bias': t['dense/bias'].astype(np.float16)}),
                    r"param 'dense/bias' is .*float16.*the metadata says"),
    'kernel_dtype_invalid': (_edit_kernel('dense/kernel', dtype='int8'), r"dense/kernel': dtype 'int8' is not a float"),
    'kernel_dtype_unknown': (_edit_kernel('dense/kernel', dtype='float99'), r"dense/kernel': dtype 'float99' is not"),
    'kernel_dtype_null': (_edit_kernel('dense/kernel', dtype=None), r"dense/kernel': dtype None is not a float"),
    'kernels_not_dict': (lambda t, i: i.update({'kernels': []}), r"'kernels' and 'params' must be JSON objects"),
}


@pytest.mark.parametrize('fmt, case', [(export.FORMAT, c) for c in sorted(DAMAGE) + sorted(DAMAGE_2)]
                         + [(export.FORMAT_1, c) for c in sorted(DAMAGE)])
def test_every_metadata_field_is_checked_against_the_tensors(tmp_path, fmt, case):
  """Files with a valid checksum but fields that do not fit the tensors (a buggy or foreign writer; '/1' files,
  whose checksum does not cover the metadata): ValueError naming the file, the kernel or param and the field."""
  params, qtensors = _model()
  good = str(tmp_path / 'good.safetensors')
  export.save_safetensors(good, params, qtensors)
  tensors, info = _parts(good)
  if fmt == export.FORMAT_1:
    tensors, info = _legacy(tensors, info)
  edit, message = (DAMAGE | DAMAGE_2)[case]
  edit(tensors, info)
  path = str(tmp_path / 'bad.safetensors')
  _write(path, tensors, info, fmt)
  with pytest.raises(ValueError, match=re.escape(path) + '.*' + message):
    export.load_safetensors(path)


def test_format_1_files_still_load(tmp_path):
  params, qtensors = _model()
  good = str(tmp_path / 'good.safetensors')
  export.save_safetensors(good, params, qtensors)
  tensors, info = _legacy(*_parts(good))
  path = str(tmp_path / 'v1.safetensors')
  _write(path, tensors, info, export.FORMAT_1)
  loaded, loaded_q = export.load_safetensors(path)
  want = {n: p for n, p in params.items() if n != 'head'}
  _assert_same(loaded, loaded_q, want, {n: q for n, q in qtensors.items() if n != 'head/kernel'})


def test_metadata_that_is_not_json_is_an_error_naming_the_field(tmp_path):
  from safetensors.numpy import save_file
  path = str(tmp_path / 'bad.safetensors')
  save_file({'w': np.ones(2, np.float32)}, path, metadata={'flexround_jax': '{"format": ', 'sha256': '0'})
  with pytest.raises(ValueError, match=re.escape(path) + ".*'flexround_jax' is not valid JSON"):
    export.load_safetensors(path)


# -------------------------------------------------------------------------------------------------------- Orbax ----

@dataclasses.dataclass
class _Result:
  params: dict
  qtensors: dict


def test_orbax_round_trip_keeps_dtypes_and_bits(tmp_path):
  params, qtensors = _model()
  export.save_orbax(str(tmp_path / 'q'), _Result(params, qtensors))
  _assert_same(*export.load_orbax(str(tmp_path / 'q')), params, qtensors)


def test_orbax_array_that_does_not_match_the_manifest_is_an_error(tmp_path):
  params, qtensors = _model()
  good, other = str(tmp_path / 'good'), str(tmp_path / 'other')
  export.save_orbax(good, _Result(params, qtensors))
  changed = dict(qtensors)
  qt = qtensors['dense/kernel']
  changed['dense/kernel'] = dataclasses.replace(qt, codes=(np.asarray(qt.codes) + 1) % 16)
  export.save_orbax(other, _Result(params, changed))
  shutil.rmtree(os.path.join(other, 'meta'))
  shutil.copytree(os.path.join(good, 'meta'), os.path.join(other, 'meta'))   # good metadata, one array changed
  with pytest.raises(ValueError, match=re.escape(other) + r".*array 'qtensors/k00002/codes' does not match"):
    export.load_orbax(other)


def test_orbax_export_without_a_manifest_or_with_bad_metadata_is_an_error(tmp_path):
  import orbax.checkpoint as ocp
  path = str(tmp_path / 'old')
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:   # as the previous version wrote it
    ckptr.save(path, args=ocp.args.Composite(state=ocp.args.StandardSave({'params': {'w': np.ones(2)}}),
                                             meta=ocp.args.JsonSave({'format': 'flexround_jax/1', 'names': [],
                                                                     'specs': []})))
  with pytest.raises(ValueError, match=re.escape(path) + '.*no checksum'):
    export.load_orbax(path)
  with open(os.path.join(path, 'meta', 'metadata'), 'w') as f:
    f.write('{"format": ')
  with pytest.raises(ValueError, match=re.escape(path)):
    export.load_orbax(path)


def test_save_orbax_refuses_an_existing_export_and_replaces_it_atomically(tmp_path, monkeypatch):
  params, qtensors = _model()
  path = str(tmp_path / 'q')
  export.save_orbax(path, _Result(params, qtensors))
  other_params, other_q = _model(seed=1)
  with pytest.raises(FileExistsError, match=re.escape(path)):
    export.save_orbax(path, _Result(other_params, other_q))
  _assert_same(*export.load_orbax(path), params, qtensors)

  import orbax.checkpoint as ocp

  real_save = ocp.Checkpointer.save

  def crash(self, *args, **kwargs):   # dies after writing part of the new export
    real_save(self, *args, **kwargs)
    raise RuntimeError('disk full')
  with monkeypatch.context() as m:   # a crash while writing leaves the old export in place
    m.setattr(ocp.Checkpointer, 'save', crash)
    with pytest.raises(RuntimeError, match='disk full'):
      export.save_orbax(path, _Result(other_params, other_q), overwrite=True)
  _assert_same(*export.load_orbax(path), params, qtensors)

  export.save_orbax(path, _Result(other_params, other_q), overwrite=True)
  _assert_same(*export.load_orbax(path), other_params, other_q)
  assert sorted(os.listdir(tmp_path)) == ['q']   # no temporary or old copy left behind


# ------------------------------------------------------------------------------------------ per-unit checkpoints ----

def _checkpoints(directory):
  """Steps 1 and 2 of a fake run (two units done), the second with cached activations; returns what each holds."""
  rng = np.random.default_rng(0)
  _, qtensors = _model()
  step1 = {'dense/kernel': qtensors['dense/kernel']}
  acts = {'x_q': [rng.normal(size=(4, 3)).astype(np.float32)], 'x_fp': [rng.normal(size=(4, 3)).astype(np.float32)]}
  ckpt = checkpoint.Checkpointer(directory, 'fp0')
  ckpt.save(1, step1, [{'unit': 'u0', 'loss': 0.5}], None)
  report = [{'unit': 'u0', 'loss': 0.5}, {'unit': 'u1', 'loss': float('nan')}]
  ckpt.save(2, qtensors, report, acts)
  ckpt.close()
  return (1, step1, report[:1], None), (2, qtensors, report, acts)


def _restore(directory, fingerprint='fp0', n_units=3):
  ckpt = checkpoint.Checkpointer(directory, fingerprint)
  try:
    return ckpt.restore([None] * n_units)
  finally:
    ckpt.close()


def _holds(restored, want) -> bool:
  completed, qtensors, report, acts = restored
  if completed != want[0] or not _is_same({}, qtensors, {}, want[1]):
    return False
  if json.dumps(report) != json.dumps(want[2]):
    return False
  if (acts is None) != (want[3] is None):
    return False
  return acts is None or all(integrity.manifest(acts[k]) == integrity.manifest(want[3][k]) for k in want[3])


def test_checkpoint_round_trip(tmp_path):
  directory = str(tmp_path / 'ckpt')
  _, step2 = _checkpoints(directory)
  assert _holds(_restore(directory), step2)
  assert checkpoint.describe(directory)['completed'] == 2


def _damage_meta(directory, step):
  path = os.path.join(directory, 'units', str(step), 'meta', 'metadata')
  meta = json.load(open(path))
  meta['report'][0]['loss'] = 0.25   # still valid JSON, still the right keys: only the seal can tell
  json.dump(meta, open(path, 'w'))


def test_damaged_newest_checkpoint_falls_back_to_the_previous_step_with_a_warning(tmp_path):
  directory = str(tmp_path / 'ckpt')
  step1, step2 = _checkpoints(directory)
  _damage_meta(directory, 2)
  with pytest.warns(UserWarning, match='step 2 at ' + re.escape(os.path.join(directory, 'units', '2')) + ' is damaged'):
    restored = _restore(directory)
  assert _holds(restored, step1)
  ckpt = checkpoint.Checkpointer(directory, 'fp0')   # the resumed run redoes unit 2 and saves over the damaged step
  ckpt.save(*step2)
  ckpt.close()
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert _holds(_restore(directory), step2)


def test_damaged_arrays_fall_back_and_no_intact_step_is_an_error(tmp_path):
  directory = str(tmp_path / 'ckpt')
  step1, _ = _checkpoints(directory)
  shutil.rmtree(os.path.join(directory, 'units', '2', 'state'))
  with pytest.warns(UserWarning, match='step 2'):
    assert _holds(_restore(directory), step1)
  _damage_meta(directory, 1)
  with pytest.warns(UserWarning), pytest.raises(ValueError, match=re.escape(directory) + '.*no intact checkpoint'):
    _restore(directory)


def test_checkpoint_without_a_seal_is_damaged_and_a_fingerprint_mismatch_is_not(tmp_path):
  directory = str(tmp_path / 'ckpt')
  _checkpoints(directory)
  with pytest.raises(ValueError, match='different config'):
    _restore(directory, fingerprint='fp1')
  with pytest.raises(ValueError, match='2 units done, the model has 1'):
    _restore(directory, n_units=1)
  for step in (1, 2):   # as the previous version wrote them: no seal, no manifest
    path = os.path.join(directory, 'units', str(step), 'meta', 'metadata')
    meta = json.load(open(path))
    json.dump({k: v for k, v in meta.items() if k not in ('sha256', 'arrays')}, open(path, 'w'))
  with pytest.warns(UserWarning, match='no checksum'), pytest.raises(ValueError, match='no intact checkpoint'):
    _restore(directory)


# ------------------------------------------------------------------------------------------------------- fuzzing ----

def _flip(path, rng) -> None:
  data = bytearray(open(path, 'rb').read())
  if not data:
    return
  offset = int(rng.integers(len(data)))
  data[offset] = (data[offset] + int(rng.integers(1, 256))) % 256
  open(path, 'wb').write(bytes(data))


def _files(directory):
  return sorted(os.path.join(root, f) for root, _, files in os.walk(directory) for f in files)


def test_fuzz_safetensors_single_byte_flips(tmp_path):
  params, qtensors = _model()
  good = str(tmp_path / 'good.safetensors')
  export.save_safetensors(good, params, qtensors)
  rng = np.random.default_rng(0)
  counts = {'identical': 0, 'error': 0}
  path = str(tmp_path / 'flipped.safetensors')
  for _ in range(300):
    shutil.copyfile(good, path)
    _flip(path, rng)
    try:
      loaded = export.load_safetensors(path)
    except ValueError as e:
      assert path in str(e), e
      counts['error'] += 1
      continue
    _assert_same(*loaded, params, qtensors)
    counts['identical'] += 1
  print('safetensors flips:', counts)
  assert counts['error'] > 250


def test_fuzz_orbax_export_single_byte_flips(tmp_path):
  params, qtensors = _model()
  good = str(tmp_path / 'good')
  export.save_orbax(good, _Result(params, qtensors))
  files = [os.path.relpath(f, good) for f in _files(good)]
  rng = np.random.default_rng(1)
  counts = {'identical': 0, 'error': 0}
  for i in range(60):
    path = str(tmp_path / f'flipped{i}')
    shutil.copytree(good, path)
    _flip(os.path.join(path, files[int(rng.integers(len(files)))]), rng)
    try:
      loaded = export.load_orbax(path)
    except ValueError as e:
      assert path in str(e), e
      counts['error'] += 1
    else:
      _assert_same(*loaded, params, qtensors)
      counts['identical'] += 1
    shutil.rmtree(path)
  print('orbax export flips:', counts)
  assert counts['error'] > 0


def test_fuzz_checkpoint_single_byte_flips(tmp_path):
  good = str(tmp_path / 'good')
  step1, step2 = _checkpoints(good)
  files = [os.path.relpath(f, good) for f in _files(good)]
  rng = np.random.default_rng(2)
  counts = {'newest': 0, 'fell_back': 0, 'error': 0}
  for i in range(60):
    path = str(tmp_path / f'flipped{i}')
    shutil.copytree(good, path)
    _flip(os.path.join(path, files[int(rng.integers(len(files)))]), rng)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      try:
        restored = _restore(path)
      except ValueError as e:
        assert path in str(e), e
        counts['error'] += 1
        restored = None
    damaged = [str(w.message) for w in caught if 'damaged' in str(w.message)]
    if restored is not None and _holds(restored, step2):
      counts['newest'] += 1
    elif restored is not None:
      assert _holds(restored, step1), 'a flipped byte gave a checkpoint that is neither step'
      assert damaged and os.path.join(path, 'units', '2') in damaged[0], caught
      counts['fell_back'] += 1
    shutil.rmtree(path)
  print('checkpoint flips:', counts)
  assert counts['fell_back'] > 0


# ---------------------------------------------------------------------------------------------------------- GGUF ----

@pytest.fixture(scope='module')
def tiny_llama():
  return tiny_gguf.tiny_llama()


def test_tiny_gguf_loads_exactly(tmp_path, tiny_llama):
  from flexround_jax.models import llama
  config, params = tiny_llama
  path = str(tmp_path / 'tiny.gguf')
  tiny_gguf.write_gguf(path, params, config)
  _, loaded, _, loaded_config = llama.load_smollm2(path)
  assert loaded_config.n_layers == 2
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


@pytest.mark.parametrize('case', ['block_count_short', 'block_count_long', 'unknown_tensor', 'wrong_shape',
                                  'missing_tensor'])
def test_gguf_tensors_must_match_the_metadata(tmp_path, tiny_llama, case):
  """block_count 1 over 2 blocks of tensors used to load a 1-block model silently."""
  from flexround_jax.models import llama
  config, params = tiny_llama
  path = str(tmp_path / f'{case}.gguf')
  kwargs, message = {
      'block_count_short': ({'block_count': 1}, r"tensor 'blk\.1\.attn_k\.weight' is not read.*block_count = 1"),
      'block_count_long': ({'block_count': 3}, r"lacks tensor 'blk\.2\.attn_norm\.weight'"),
      'unknown_tensor': ({'extra': {'rope_freqs.weight': np.ones(8, np.float32)}}, r"tensor 'rope_freqs.weight'"),
      'wrong_shape': ({'drop': 'blk.1.ffn_up.weight', 'extra': {'blk.1.ffn_up.weight': np.ones((48, 30), np.float32)}},
                      r"tensor 'blk\.1\.ffn_up\.weight' has shape \(48, 30\), the config expects \(48, 32\)"),
      'missing_tensor': ({'drop': 'output_norm.weight'}, r"lacks tensor 'output_norm\.weight'"),
  }[case]
  tiny_gguf.write_gguf(path, params, config, **kwargs)
  with pytest.raises(ValueError, match=re.escape(path) + '.*' + message):
    llama.load_smollm2(path)
