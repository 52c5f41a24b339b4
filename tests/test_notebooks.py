"""The example notebooks in experiments/notebooks run top to bottom and are saved without outputs.

Both notebooks run in one Jupyter kernel each (nbclient, kernel `python3`, cwd = the notebooks
folder) with CMID_NOTEBOOK_FAST=1; they share one workdir, so `features.ipynb` loads the model
`quickstart.ipynb` pretrained instead of training its own.
"""

import os
from pathlib import Path

import nbclient
import nbformat
import pytest

from conftest import TIMEOUT_SCALE

NOTEBOOKS = Path(__file__).resolve().parents[1] / 'experiments' / 'notebooks'
ORDER = ('quickstart.ipynb', 'features.ipynb')  # features reuses the quickstart workdir.


@pytest.mark.parametrize('name', ORDER)
def test_saved_notebook_has_no_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == 'code':
            assert cell.outputs == [], f'{name} cell {i} has saved outputs'
            assert cell.execution_count is None, f'{name} cell {i} has an execution count'


@pytest.mark.slow
def test_notebooks_execute(tmp_path, monkeypatch):
    monkeypatch.setenv('CMID_NOTEBOOK_FAST', '1')
    monkeypatch.setenv('CMID_NOTEBOOK_WORKDIR', str(tmp_path / 'workdir'))
    # One real CPU device in the kernels, as for a user (conftest fakes eight for the other tests).
    flags = os.environ.get('XLA_FLAGS', '').split()
    monkeypatch.setenv(
        'XLA_FLAGS',
        ' '.join(f for f in flags if not f.startswith('--xla_force_host_platform_device_count')),
    )
    for name in ORDER:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        client = nbclient.NotebookClient(
            nb,
            timeout=int(600 * TIMEOUT_SCALE),
            kernel_name='python3',
            resources={'metadata': {'path': str(NOTEBOOKS)}},
        )
        try:
            client.execute()  # Raises CellExecutionError on the first failing cell.
        except nbclient.exceptions.CellExecutionError as e:
            pytest.fail(f'{name} failed:\n{e}')
        errors = [
            o
            for c in nb.cells
            if c.cell_type == 'code'
            for o in c.outputs
            if o.output_type == 'error'
        ]
        assert not errors, f'{name}: {errors}'
