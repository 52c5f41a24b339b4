"""End to end: the CLI, config checks, preemption and exact resume, real-data training."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cmid_jax import errors, train
from cmid_jax.config_resolve import resolve
from cmid_jax.restore import restore_train_state
from cmid_jax.workdir import Workdir
from configs import resnet50, vitb

from conftest import REPO, SHARED_DATA


def cli(workdir, *flags):
    return [
        sys.executable,
        '-m',
        'cmid_jax.main',
        '--config=configs/vitb.py:smoke',
        f'--workdir={workdir}',
        *flags,
    ]


def metrics(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def checkpoint_steps(workdir):
    return Workdir(workdir).checkpoints(read_only=True).steps()


def test_cli_rejects_a_misspelt_field(tmp_path):
    out = subprocess.run(
        cli(tmp_path, '--config.total_stepz=3'),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == errors.EXIT_USER_ERROR
    assert out.stderr.splitlines()[0] == (
        "Error: unknown config field: 'total_stepz' Did you "
        'mean "total_steps" instead of "total_stepz"?'
    )
    assert 'Traceback' not in out.stderr and len(out.stderr.splitlines()) == 2
    assert not os.path.exists(tmp_path / 'ckpt')


def test_demo_presets_pass_the_config_checks_and_say_what_healthy_looks_like():
    from configs import swinb

    for module in (vitb, resnet50, swinb):
        config = module.get_config('demo')
        resolve(config, num_devices=1, num_processes=1)
    line = train.healthy_start(vitb.get_config('demo'))
    # queue 256 filled by 2 x 16 keys a step; 256 prototypes; teacher warm-up 2 epochs of 10 steps.
    assert f'ln(1 + queue_size) = {math.log(257):.2f}' in line and '(8 steps)' in line
    assert f'ln(local_prototypes) = {math.log(256):.2f}' in line and '(20 steps)' in line
    config = vitb.get_config('demo')
    config.loss.use_global = False
    assert 'loss_global' not in train.healthy_start(config)


@pytest.mark.parametrize(
    'overrides, message',
    [
        ({'batch_size': 12}, 'batch_size=12 must be a positive multiple of the 8 devices'),
        ({'data.image_size': 80}, 'data.image_size=80 must be a multiple of mask.patch_size=32'),
        ({'loss.num_matches': 5}, 'loss.num_matches=5 must be in [1, 4]'),
        ({'loss.queue_size': 8}, 'loss.queue_size=8 must be at least the 16 keys a step enqueues'),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    config = vitb.get_config('smoke')
    for key, value in overrides.items():
        node, *path = key.split('.')
        if path:
            config[node][path[0]] = value
        else:
            config[node] = value
    with pytest.raises(ValueError) as e:
        resolve(config, num_devices=8, num_processes=1)
    assert message in str(e.value)


RUN_FLAGS = ['--config.total_steps=40', '--config.log_every_steps=1']


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    """The reference: the 40-step smoke run in one go, by the command the interrupted runs use (a
    process of its own: the same devices, so the same arithmetic to the last bit)."""
    workdir = tmp_path_factory.mktemp('uninterrupted')
    proc = subprocess.run(
        cli(workdir, *RUN_FLAGS), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, state, _ = restore_train_state(str(workdir))
    return state, {r['step']: r for r in metrics(workdir)}


def assert_same_run(workdir, uninterrupted):
    ref_state, ref_rows = uninterrupted
    last = {r['step']: r for r in metrics(workdir)}  # After a crash, the later line of a step wins.
    assert sorted(last) == list(range(1, 41))
    for step, r in last.items():
        for k in ('loss', 'loss_mim', 'loss_global', 'loss_local'):
            np.testing.assert_allclose(r[k], ref_rows[step][k], rtol=1e-6, err_msg=f'{k} {step}')
    _, state, _ = restore_train_state(str(workdir))
    for key in ('params', 'teacher_params', 'queue', 'center', 'opt_state'):
        jax.tree.map(
            lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
            state[key],
            ref_state[key],
        )


def wait_for_step(proc, workdir, step):
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        rows = metrics(workdir) if os.path.exists(workdir / 'metrics.jsonl') else []
        if rows and rows[-1]['step'] >= step:
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    workdir = tmp_path / 'preempted'
    flags = [*RUN_FLAGS, '--config.checkpoint_every_steps=1000']
    proc = subprocess.Popen(
        cli(workdir, *flags), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_step(proc, workdir, 5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == errors.EXIT_PREEMPTED, stderr[-2000:]  # Retry loops run it again.
    assert 'Preempted (SIGTERM)' in stderr
    stopped_at = metrics(workdir)[-1]['step']
    assert 5 <= stopped_at < 40
    assert checkpoint_steps(workdir)[-1] == stopped_at

    resumed = subprocess.run(
        cli(workdir, *flags), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f'Resumed from the checkpoint of step {stopped_at}' in resumed.stderr
    assert_same_run(workdir, uninterrupted)


@pytest.mark.slow
def test_sigkill_during_checkpointing_never_loses_a_complete_checkpoint(tmp_path, uninterrupted):
    """SIGKILL at random moments (a save is in flight at almost every step); every relaunch
    resumes from a complete checkpoint and the finished run equals an uninterrupted one."""
    workdir = tmp_path / 'killed'
    flags = [*RUN_FLAGS, '--config.checkpoint_every_steps=1', '--config.keep_checkpoints=2']
    rng = np.random.default_rng(0)
    resumed_from = []
    for attempt in range(2):
        proc = subprocess.Popen(
            cli(workdir, *flags),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for_step(proc, workdir, 10 * (attempt + 1) + int(rng.integers(0, 5)))
        proc.kill()
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
        if attempt:
            resumed_from.append(
                int(stderr.split('Resumed from the checkpoint of step ')[1].split()[0])
            )
        latest = checkpoint_steps(workdir)[-1]
        _, state, step = restore_train_state(str(workdir))
        assert step == latest and int(state['step']) == latest > 0

    done = subprocess.run(
        cli(workdir, *flags), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert resumed_from and 'Resumed from the checkpoint of step' in done.stderr
    assert_same_run(workdir, uninterrupted)


@pytest.mark.slow
def test_short_pretraining_on_aid_lowers_the_loss(tmp_path):
    """120 ResNet steps on the real AID subset: the total loss and the MIM loss fall."""
    config = resnet50.get_config('smoke')
    config.data.path = str(SHARED_DATA / 'aid')
    config.total_steps, config.steps_per_epoch, config.log_every_steps = 120, 10, 1
    config.checkpoint_every_steps = 1000
    config.loss.queue_size = 16  # Fills in one step, so the queue's warm-up does not move the loss.
    config.optim.base_lr = 0.05
    train.train_and_evaluate(config, str(tmp_path))
    rows = metrics(tmp_path)
    loss = np.array([r['loss'] for r in rows])
    mim = np.array([r['loss_mim'] for r in rows])
    assert len(rows) == 120 and np.all(np.isfinite(loss))
    print(
        '30-step windows: loss',
        loss.reshape(4, 30).mean(1).round(3),
        'mim',
        mim.reshape(4, 30).mean(1).round(3),
    )
    assert loss[-30:].mean() < loss[:30].mean() - 0.4
    assert mim[-30:].mean() < 0.8 * mim[:30].mean()
    assert rows[-1]['bad_images'] == 0


@pytest.mark.slow
def test_nonfinite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    config = vitb.get_config('smoke')
    config.total_steps, config.checkpoint_every_steps = 6, 2
    config.optim.base_lr = 1e30  # The first update blows the weights up; step 2 is non-finite.
    with pytest.raises(
        FloatingPointError, match=r'Non-finite loss or gradient at step 2 \(loss=nan'
    ) as e:
        train.train_and_evaluate(config, str(tmp_path))
    # A UserError: the command prints it as one line with this hint, no traceback (exit 2).
    assert isinstance(e.value, errors.UserError) and 'base_lr' in e.value.hint
    assert checkpoint_steps(tmp_path) == [1]
    _, state, _ = restore_train_state(str(tmp_path))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state['params']))


@pytest.mark.slow
def test_nonfinite_steps_can_be_skipped_and_counted(tmp_path):
    config = vitb.get_config('smoke')
    config.total_steps, config.checkpoint_every_steps, config.log_every_steps = 6, 1, 1
    config.keep_checkpoints = 6
    config.optim.base_lr = 1e30
    config.max_nonfinite_steps = 10
    train.train_and_evaluate(config, str(tmp_path))
    assert [r['nonfinite_steps'] for r in metrics(tmp_path)] == [0, 1, 2, 3, 4, 5]
    _, after_1, _ = restore_train_state(str(tmp_path), step=1)
    _, after_6, _ = restore_train_state(str(tmp_path), step=6)
    # Skipped steps never touch the weights, the teacher or the queue.
    for key in ('params', 'teacher_params', 'queue', 'center'):
        jax.tree.map(np.testing.assert_array_equal, after_1[key], after_6[key])


def test_unreadable_data_and_unwritable_workdir_fail_before_compiling(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(train.TrainStep, 'create', lambda *a, **k: compiled.append(1))
    bad = tmp_path / 'bad'
    bad.mkdir()
    for i in range(20):
        (bad / f'img_{i:02d}.jpg').write_text('not a jpeg')
    config = vitb.get_config('smoke')
    config.data.path = str(bad)
    with pytest.raises(errors.DataError, match=r'no usable images in 64 random tries .*img_'):
        train.train_and_evaluate(config, str(tmp_path / 'run'))
    (tmp_path / 'file').write_text('a file where the workdir should be')
    config.data.path = None
    with pytest.raises(errors.WorkdirError, match='Cannot write to the workdir .*file/run'):
        train.train_and_evaluate(config, str(tmp_path / 'file' / 'run'))
    assert not compiled
