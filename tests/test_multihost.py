"""Two JAX processes x 2 CPU devices run the same computation as one process on one device."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from cmid_jax import train
from cmid_jax.restore import restore_train_state
from configs import vitb

from conftest import REPO, TIMEOUT_SCALE

FLAGS = [
    '--config.total_steps=6',
    '--config.log_every_steps=1',
    '--config.checkpoint_every_steps=3',
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def launch_two_processes(workdir) -> None:
    port = free_port()
    procs = []
    for pid in range(2):
        # No persistent compilation cache: a process that loads the step from it while the
        # other compiles can leave it waiting past Gloo's 30 s set-up deadline.
        env = dict(
            os.environ,
            JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
            JAX_NUM_PROCESSES='2',
            JAX_PROCESS_ID=str(pid),
            XLA_FLAGS='--xla_force_host_platform_device_count=2',
            JAX_ENABLE_COMPILATION_CACHE='false',
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    '-m',
                    'cmid_jax.main',
                    '--config=configs/vitb.py:smoke',
                    f'--workdir={workdir}',
                    *FLAGS,
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        _, err = p.communicate(timeout=600 * TIMEOUT_SCALE)
        assert p.returncode == 0, err[-3000:]


def losses(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    return {
        r['step']: [r[k] for k in ('loss', 'loss_mim', 'loss_global', 'loss_local')] for r in rows
    }


@pytest.mark.slow
def test_two_processes_equal_one_process_and_resume(tmp_path):
    config = vitb.get_config('smoke')
    config.total_steps, config.log_every_steps, config.checkpoint_every_steps = 6, 1, 3
    single = tmp_path / 'single'
    train.train_and_evaluate(config, str(single))

    multi = tmp_path / 'multi'
    launch_two_processes(multi)
    ref, got = losses(single), losses(multi)
    assert sorted(got) == list(range(1, 7))
    for step in ref:
        np.testing.assert_allclose(got[step], ref[step], rtol=1e-5, atol=1e-5, err_msg=str(step))
    _, a, _ = restore_train_state(str(single))
    _, b, _ = restore_train_state(str(multi))
    for key in ('params', 'teacher_params', 'batch_stats', 'queue', 'center'):
        jax.tree.map(
            lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), a[key], b[key]
        )

    # A crash after the cooperative checkpoint of step 3: both processes resume from it.
    shutil.rmtree(multi / 'ckpt' / '6')
    os.remove(multi / 'metrics.jsonl')
    launch_two_processes(multi)
    resumed = losses(multi)
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        np.testing.assert_allclose(resumed[step], ref[step], rtol=1e-5, atol=1e-5)
    _, c, _ = restore_train_state(str(multi))
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5),
        a['params'],
        c['params'],
    )
