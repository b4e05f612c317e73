"""The Fashion-MNIST TFDS builder on tiny synthetic IDX files: prepare, read back through tfds.data_source."""

import os

import numpy as np
import pytest

from flexround_jax.data import fashion_mnist


def _write_source(folder, n_train=12, n_test=5, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in (('train', n_train), ('test', n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    img_file, lbl_file = fashion_mnist.FILES[split]
    fashion_mnist.write_idx(os.path.join(folder, img_file), images)
    fashion_mnist.write_idx(os.path.join(folder, lbl_file), labels)
    arrays[split] = (images, labels)
  return arrays


def test_idx_round_trip(tmp_path):
  a = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
  fashion_mnist.write_idx(str(tmp_path / 'x.gz'), a)
  np.testing.assert_array_equal(fashion_mnist.read_idx(str(tmp_path / 'x.gz')), a)


def test_prepare_and_read_back(tmp_path):
  source, data_dir = tmp_path / 'idx', tmp_path / 'tfds'
  source.mkdir()
  written = _write_source(str(source))
  path = fashion_mnist.prepare(data_dir=str(data_dir), source_dir=str(source))
  assert os.path.isdir(path)
  for split, (images, labels) in written.items():
    x, y = fashion_mnist.load_arrays(split, data_dir=str(data_dir))
    assert x.shape == (len(images), 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int32
    # Stored order is TFDS's shuffle of the keys: compare as a set of (image, label) rows.
    key = lambda im, lb: [im[i].tobytes() + bytes([lb[i]]) for i in range(len(lb))]
    assert sorted(key(x[..., 0], y)) == sorted(key(images, labels))
  # A second prepare is a no-op, even without the source files.
  assert fashion_mnist.prepare(data_dir=str(data_dir), source_dir=str(tmp_path / 'gone')) == path


def test_source_dir_from_env(tmp_path, monkeypatch):
  monkeypatch.setenv(fashion_mnist.SOURCE_DIR_ENV, str(tmp_path))
  assert fashion_mnist.resolve_source_dir() == str(tmp_path)
  assert fashion_mnist.resolve_source_dir('/x') == '/x'


def test_missing_files_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'make data.*apt-get install -y dataset-fashion-mnist'):
    fashion_mnist.prepare(data_dir=str(tmp_path / 'tfds'), source_dir=str(tmp_path / 'empty'))


def test_split_indices_fixed_and_disjoint():
  s = fashion_mnist.split_indices()
  assert [len(s[k]) for k in ('calibration', 'validation', 'train')] == [1024, 5000, 53976]
  assert len(np.unique(np.concatenate(list(s.values())))) == 60000
  np.testing.assert_array_equal(s['calibration'], fashion_mnist.split_indices()['calibration'])
  np.testing.assert_array_equal(s['calibration'][:5], np.random.default_rng(0).permutation(60000)[:5])
