"""Test session set-up: eight fake CPU devices in this process, so sharded and single-device runs
can be compared; one device in the tools it starts and, unless a test is marked `multidevice`, in
the meshes it trains on here (eight fake devices on two cores make a CMID step about 2.3x slower:
120 ResNet smoke steps take 89 s on eight, 38 s on one)."""

import os
import tempfile
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The CLI tests start fresh processes that compile the same steps as in-process runs; a shared
# persistent compilation cache spares each of them the compile.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='cmid_jax_xla_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import jax  # noqa: E402
import pytest  # noqa: E402

# A jax option, not XLA_FLAGS: the processes the tests start do not inherit it.
jax.config.update('jax_num_cpu_devices', 8)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'

import subprocess  # noqa: E402
import sys  # noqa: E402

# Subprocess deadlines scale with CMID_TEST_TIMEOUT_SCALE (e.g. 4 on a loaded machine).
TIMEOUT_SCALE = float(os.environ.get('CMID_TEST_TIMEOUT_SCALE', '1'))


def run_tool(
    module: str,
    *args: str,
    timeout: float = 600,
    env: dict | None = None,
    python_code: str | None = None,
) -> subprocess.CompletedProcess:
    """Runs `python -m cmid_jax.<module> ARGS` (or `python -c python_code ARGS`) from the repo.

    The deadline is generous and scales, so a slow machine never fails a correct run.
    """
    command = (
        [sys.executable, '-c', python_code]
        if python_code
        else [sys.executable, '-m', f'cmid_jax.{module}']
    )
    return subprocess.run(
        command + list(args),
        cwd=REPO,
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout * TIMEOUT_SCALE,
    )


# grain's worker processes read absl flags, which only a program run by absl has parsed.
from absl import flags as _absl_flags  # noqa: E402

_absl_flags.FLAGS.mark_as_parsed()


# Session-wide (module fixtures that train included): `parallel.make_mesh()` spans the first device;
# a test marked `multidevice` gets all eight. Meshes built from explicit devices are left alone.
from cmid_jax import parallel  # noqa: E402

_all_devices_mesh = parallel.make_mesh


def _first_device_mesh(devices=None):
    return _all_devices_mesh(jax.devices()[:1] if devices is None else devices)


parallel.make_mesh = _first_device_mesh


@pytest.fixture(autouse=True)
def _all_devices_if_multidevice(request, monkeypatch):
    if request.node.get_closest_marker('multidevice'):
        monkeypatch.setattr(parallel, 'make_mesh', _all_devices_mesh)
