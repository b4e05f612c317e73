"""Every notebook runs top to bottom with a tiny budget (FLEXROUND_NOTEBOOK_TINY=1) and no cell error.

The image notebook reads Fashion-MNIST through the project's TFDS builder; here it gets synthetic IDX files of
the real format (CI has no Debian data package), in a TFDS data folder of its own.
"""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

from flexround_jax.data import fashion_mnist
from test_fashion_mnist import _write_source   # synthetic IDX files in the real format

HERE = os.path.join(os.path.dirname(__file__), '..', 'notebooks')
NOTEBOOKS = sorted(glob.glob(os.path.join(HERE, '*.ipynb')))


def test_every_notebook_is_tested():
  assert {os.path.basename(p) for p in NOTEBOOKS} >= {'quickstart.ipynb', 'image_track.ipynb', 'llm_track.ipynb'}


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch, tmp_path):
  monkeypatch.setenv('FLEXROUND_NOTEBOOK_TINY', '1')
  if 'image' in os.path.basename(path):
    (tmp_path / 'idx').mkdir()
    _write_source(str(tmp_path / 'idx'), n_train=6200, n_test=300)   # > 6024: calibration + validation + train
    monkeypatch.setenv(fashion_mnist.SOURCE_DIR_ENV, str(tmp_path / 'idx'))
    monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  nb = nbformat.read(path, as_version=4)
  assert all(not c.get('outputs') for c in nb.cells if c.cell_type == 'code'), 'commit notebooks without outputs'
  NotebookClient(nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': HERE}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  assert any('image/png' in o.get('data', {}) for o in outputs), 'the figures must show inline'
