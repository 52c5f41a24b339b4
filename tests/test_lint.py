"""The code passes the linter and the formatter configured in pyproject.toml ([tool.ruff])."""

import shutil
import subprocess

import pytest

from conftest import REPO

RUFF = shutil.which('ruff')


@pytest.mark.parametrize(
    'command', [['check', '--no-cache', '.'], ['format', '--check', '--no-cache', '.']]
)
def test_ruff(command):
    assert RUFF, 'ruff is part of the dev extra: pip install -e .[dev]'
    proc = subprocess.run([RUFF, *command], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
