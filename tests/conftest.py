"""Test session set-up: eight fake CPU devices, so sharded and single-device runs can be compared."""

import os
import tempfile
from pathlib import Path

# Must happen before jax is imported anywhere.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The CLI tests start fresh processes that compile the same steps as in-process runs; a shared
# persistent compilation cache spares each of them the compile.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='cmid_jax_xla_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

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
