"""Every notebook runs top to bottom with a tiny budget (FLEXROUND_NOTEBOOK_TINY=1) and no cell error."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

HERE = os.path.join(os.path.dirname(__file__), '..', 'notebooks')
NOTEBOOKS = sorted(glob.glob(os.path.join(HERE, '*.ipynb')))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch):
  monkeypatch.setenv('FLEXROUND_NOTEBOOK_TINY', '1')
  nb = nbformat.read(path, as_version=4)
  assert all(not c.get('outputs') for c in nb.cells if c.cell_type == 'code'), 'commit notebooks without outputs'
  NotebookClient(nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': HERE}}).execute()
