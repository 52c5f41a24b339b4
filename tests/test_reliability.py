"""What survives what (issue 16): config checks, resume checks, the workdir lock, bad files,
exit codes and one-line errors, as a user meets them."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from cmid_jax import errors, train
from cmid_jax import metrics as metrics_lib
from cmid_jax.config_resolve import resolve, resume_changes
from cmid_jax.data import list_images, pipeline
from cmid_jax.data.bad_files import BadFiles
from cmid_jax.restore import restore_train_state
from cmid_jax.workdir import Workdir
from cmid_jax.workdir_lock import WorkdirLock
from configs import vitb

from conftest import REPO, SHARED_DATA, run_tool

SMOKE = '--config=configs/vitb.py:smoke'


def smoke(**fields):
    """The smoke config with dotted overrides: smoke(**{'optim.base_lr': 0.1})."""
    config = vitb.get_config('smoke')
    config.update_from_flattened_dict(fields)
    return config


# --------------------------------------------------------------------------- impossible values


@pytest.mark.parametrize(
    'field, value, message',
    [
        ('optim.base_lr', -0.004, 'optim.base_lr=-0.004 must be > 0'),
        ('optim.base_lr', float('nan'), 'optim.base_lr=nan must be > 0'),
        ('optim.min_lr', -1e-6, 'optim.min_lr=-1e-06 must be >= 0'),
        ('optim.min_lr', 0.5, 'optim.min_lr=0.5 must be <= the peak lr base_lr * batch_size / 256'),
        ('optim.weight_decay', -0.1, 'optim.weight_decay=-0.1 must be >= 0'),
        ('optim.warmup_epochs', -1, 'optim.warmup_epochs=-1 must be >= 0'),
        ('optim.warmup_factor', 0.0, 'optim.warmup_factor=0.0 must be in (0, 1]'),
        ('optim.ema_momentum', 1.5, 'optim.ema_momentum=1.5 must be in [0, 1]'),
        ('loss.temperature', 0.0, 'loss.temperature=0.0 must be > 0'),
        ('loss.teacher_temp', -0.07, 'loss.teacher_temp=-0.07 must be > 0'),
        ('loss.teacher_temp_warmup_epochs', -2, 'loss.teacher_temp_warmup_epochs=-2 must be >= 0'),
        ('loss.center_momentum', 1.0, 'loss.center_momentum=1.0 must be in [0, 1)'),
        ('mask.ratio', 1.0, 'mask.ratio=1.0 must be in (0, 1)'),
        ('log_every_steps', 0, 'log_every_steps=0 must be > 0'),
        ('checkpoint_every_steps', -5, 'checkpoint_every_steps=-5 must be > 0'),
        ('keep_checkpoints', 0, 'keep_checkpoints=0 must be >= 1'),
        ('total_steps', -1, 'total_steps=-1 must be >= 0'),
    ],
)
def test_values_that_cannot_work_are_named_in_one_line(field, value, message):
    with pytest.raises(errors.ConfigError) as e:
        resolve(smoke(**{field: value}), num_devices=8, num_processes=1)
    assert message in e.value.message and '\n' not in e.value.message


def test_the_smoke_and_default_configs_pass():
    resolve(vitb.get_config('smoke'), num_devices=8, num_processes=1)
    resolve(vitb.get_config(), num_devices=8, num_processes=1)


# --------------------------------------------------------------------------- resume checks


def test_resume_changes_list_what_may_not_change_with_old_and_new_values():
    saved = smoke()
    saved.steps_per_epoch, saved.data.dtype = 4, None  # as cmid-import-torch leaves them
    new = smoke(
        batch_size=16,
        seed=3,
        total_steps=40,
        log_every_steps=1,
        **{
            'model.proj_dim': 64,
            'loss.use_mim': False,
            'data.num_workers': 2,
            'data.dtype': 'uint8',
            'eval.path': '/labelled',
        },
    )
    new.steps_per_epoch = 4
    with pytest.raises(errors.WorkdirError) as e:
        resume_changes(saved, new, allow=False)
    assert (
        '(batch_size: 8 -> 16, loss.use_mim: True -> False, model.proj_dim: 32 -> 64, seed: 0 -> 3)'
    ) in e.value.message
    assert '--allow_config_change' in e.value.hint
    changes = resume_changes(saved, new, allow=True)
    assert changes == {
        'batch_size': (8, 16),
        'data.num_workers': (0, 2),
        'eval.path': (None, '/labelled'),
        'log_every_steps': (5, 1),
        'loss.use_mim': (True, False),
        'model.proj_dim': (32, 64),
        'seed': (0, 3),
        'total_steps': (20, 40),
    }  # data.dtype None: resolved


def finished_workdir(tmp_path):
    """A workdir whose run is complete (step 0 of 0), as cmid-import-torch leaves one; only the
    step number of its checkpoint matters before the state is restored, so it holds a tiny one."""
    wd = Workdir(tmp_path / 'run')
    wd.write_config(smoke(total_steps=0))
    checkpoints = wd.checkpoints()
    checkpoints.save(0, {'w': np.zeros(4, np.float32)}, force=True)
    checkpoints.close()
    return tmp_path / 'run'


def test_resume_with_another_config_stops_before_writing(tmp_path):
    workdir = finished_workdir(tmp_path)
    before = {name: (workdir / name).read_bytes() for name in os.listdir(workdir) if '.' in name}
    with pytest.raises(errors.WorkdirError, match=r'\(batch_size: 8 -> 16\); nothing was written'):
        train.train_and_evaluate(smoke(total_steps=0, batch_size=16), str(workdir))
    with pytest.raises(errors.WorkdirError, match=r'\(batch_size: 8 -> 16, seed: 0 -> 1\)'):
        train.train_and_evaluate(smoke(total_steps=3, batch_size=16, seed=1), str(workdir))
    after = {name: (workdir / name).read_bytes() for name in os.listdir(workdir) if '.' in name}
    assert after == before  # config.json untouched, no history, no lock left
    assert train.train_and_evaluate(smoke(total_steps=0), str(workdir)) == {}  # complete: no-op
    assert sorted(os.listdir(workdir)) == ['ckpt', 'config.json']


def test_running_a_finished_run_again_says_so_and_exits_0(tmp_path):
    workdir = finished_workdir(tmp_path)
    out = run_tool('main', SMOKE, f'--workdir={workdir}', '--config.total_steps=0')
    assert out.returncode == 0, out.stderr[-3000:]
    assert f'{workdir} is complete (step 0 of 0); nothing to do.' in out.stderr
    assert f'Checkpoint: {workdir}/ckpt/0' in out.stderr
    assert f'cmid-export --workdir={workdir} --out=' in out.stderr
    assert f'cmid-evaluate --workdir={workdir} --data=' in out.stderr
    assert 'Traceback' not in out.stderr and "Unable to initialize backend 'tpu'" not in out.stderr
    assert sorted(os.listdir(workdir)) == ['ckpt', 'config.json']  # the no-op left no record


# --------------------------------------------------------------------------- the workdir lock


def test_a_second_run_on_a_live_workdir_refuses_in_one_line(tmp_path):
    workdir = tmp_path / 'run'
    with WorkdirLock(Workdir(workdir)):  # this test process is the live run
        out = run_tool('main', SMOKE, f'--workdir={workdir}')
    assert out.returncode == errors.EXIT_USER_ERROR
    first, hint = out.stderr.strip().splitlines()[-2:]
    assert first.startswith(
        f'Error: The workdir {workdir} is in use by another run (host '
        f'{socket.gethostname()}, pid {os.getpid()}, started '
    )
    assert hint.startswith('  (wait for it to finish') and 'Traceback' not in out.stderr
    assert sorted(os.listdir(workdir)) == []  # no config.json, no ckpt/, and the lock is gone


# --------------------------------------------------------------------------- one-line errors


@pytest.mark.slow
@pytest.mark.parametrize(
    'args, message',
    [
        (
            [SMOKE, '--config.optim.base_lr=-1'],
            'Error: Invalid config: optim.base_lr=-1.0 must be > 0.',
        ),
        (
            ['--config=configs/no_such.py'],
            "Error: config file 'configs/no_such.py' (--config) not found",
        ),
        (
            [SMOKE, '--config.data.path=/no/such/folder'],
            "Error: image path '/no/such/folder' does not exist",
        ),
    ],
)
def test_expected_errors_are_one_line_and_a_hint_with_exit_status_2(tmp_path, args, message):
    out = run_tool('main', *args, f'--workdir={tmp_path / "run"}')
    assert out.returncode == errors.EXIT_USER_ERROR, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-2] == message and lines[-1].endswith('CMID_TRACEBACK=1 shows the traceback)')
    assert 'Traceback' not in out.stderr
    if 'no_such' in args[0]:
        shown = run_tool(
            'main', *args, f'--workdir={tmp_path / "run"}', env={'CMID_TRACEBACK': '1'}
        )
        assert 'Traceback (most recent call last)' in shown.stderr


# --------------------------------------------------------------------------- bad files


def test_a_cluster_of_bad_files_never_stops_decoding(tmp_path, aid_subset):
    """20 zero-byte files that sort together: each is replaced by a random readable one."""
    broken = tmp_path / 'broken'
    broken.mkdir()
    for i in range(20):
        (broken / f'a_{i:02d}.jpg').write_bytes(b'')
    files = sorted(aid_subset[:10] + list_images(broken))
    decode = pipeline.DecodeProcessSlice(files, image_size=64, seed=0)
    bad_seen = set()
    for index in range(len(files)):
        out = decode.decode(index, np.random.default_rng(index))
        assert out['img_a'].shape == (64, 64, 3)
        bad_seen |= set(out['bad_images'][out['bad_images'] > 0] - 1)
    assert {files[i] for i in bad_seen} == set(list_images(broken))


@pytest.mark.slow
def test_bad_file_indices_come_back_from_grain_worker_processes(tmp_path, aid_subset):
    for i in range(20):
        (tmp_path / f'a_{i:02d}.jpg').write_bytes(b'')
    files = sorted(aid_subset[:10] + list_images(tmp_path))
    dataset = pipeline.build_dataset(files, image_size=64, global_batch_size=30, seed=0)
    iterator = pipeline.make_iterator(dataset, num_workers=1)
    try:
        skipped = next(iterator)['bad_images']
    finally:
        iterator.close()
    assert {files[i] for i in skipped[skipped > 0] - 1} == set(list_images(tmp_path))


class FakeSource:
    unit = 'images'

    def __init__(self, bad):
        self.bad = bad

    def describe(self, index):
        return f'img_{index}.jpg'

    def read(self, index):
        if index in self.bad:
            raise ValueError(f'cannot identify image file img_{index}.jpg')
        return np.zeros((4, 4, 3), np.uint8)


def skipped(*rows):
    """bad_images of a batch: row i lists 1 + the indices replaced for element i."""
    out = np.zeros((len(rows), pipeline.MAX_DECODE_TRIES), np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = np.asarray(row) + 1
    return out


def test_each_bad_file_is_counted_once_across_batches_and_resumes(caplog):
    records = []
    tracker = BadFiles(FakeSource({3, 7}), [], records.append)
    with caplog.at_level('WARNING'):
        tracker.update(skipped([3], [], [3, 7], []), step=1)
        tracker.update(skipped([7], [3], [], []), step=2)  # the same files again
    assert tracker.count == 2 and [r['file'] for r in records] == ['img_3.jpg', 'img_7.jpg']
    assert records[0] == {
        'file': 'img_3.jpg',
        'index': 3,
        'step': 1,
        'reason': 'ValueError: cannot identify image file img_3.jpg',
    }
    assert caplog.text.count('Unreadable img_3.jpg') == 1
    resumed = BadFiles(FakeSource({3, 7, 9}), records, records.append)  # bad_files.jsonl
    resumed.update(skipped([3], [9], [], []), step=3)
    assert resumed.count == 3 and [r['file'] for r in records][-1] == 'img_9.jpg'


def test_too_large_a_share_of_bad_files_stops_with_the_share():
    tracker = BadFiles(FakeSource(set(range(100))), [], lambda record: None)
    tracker.update(skipped([0, 1], [2], [], []), step=1)  # 3 bad of the 7 read
    with pytest.raises(
        ValueError,
        match=r'7 of the 13 images read so far are unreadable \(54%, '
        r'more than 50%\)',
    ):
        tracker.update(skipped([4, 5, 6, 7], []), step=2)


@pytest.fixture(scope='module')
def aid_subset():
    if not (SHARED_DATA / 'aid').is_dir():
        pytest.skip('shared AID data not found')
    return list_images(SHARED_DATA / 'aid')[::30]  # 40 images of every class


@pytest.mark.slow
def test_bad_files_corrupt_checkpoint_and_resume_history_on_real_images(
    tmp_path, aid_subset, caplog
):
    """AID images plus a folder of zero-byte files: the run never dies; each bad file is listed
    once and the count survives the resume; a damaged newest checkpoint is moved aside and the
    run resumes from the one before; the resume is recorded with its changed fields."""
    data = tmp_path / 'data'
    (data / 'broken').mkdir(parents=True)
    for f in aid_subset:
        shutil.copy(f, data / os.path.basename(f))
    for i in range(12):
        (data / 'broken' / f'zero_{i:02d}.jpg').write_bytes(b'')
    workdir = tmp_path / 'run'
    config = smoke(
        total_steps=4, checkpoint_every_steps=2, log_every_steps=1, **{'data.path': str(data)}
    )
    train.train_and_evaluate(config, str(workdir))
    wd = Workdir(workdir)
    listed = [r['file'] for r in wd.read_jsonl('bad_files.jsonl')]
    assert listed and len(listed) == len(set(listed))
    assert all('/broken/zero_' in f for f in listed)
    assert [r['bad_images'] for r in wd.read_jsonl('metrics.jsonl')][-1] == len(listed)

    os.remove(workdir / 'ckpt' / '4' / 'state' / '_METADATA')  # the newest checkpoint is damaged
    config.total_steps = 8
    with caplog.at_level('WARNING'):
        train.train_and_evaluate(config, str(workdir))
    assert 'The checkpoint of step 4 is damaged' in caplog.text
    assert 'Resuming with changed settings (total_steps: 4 -> 8)' in caplog.text
    assert len(os.listdir(workdir / 'ckpt_corrupt')) == 1
    rows = wd.read_jsonl('metrics.jsonl')
    assert [r['step'] for r in rows] == [1, 2, 3, 4, 3, 4, 5, 6, 7, 8]  # resumed from step 2
    relisted = [r['file'] for r in wd.read_jsonl('bad_files.jsonl')]
    assert relisted[: len(listed)] == listed and len(relisted) == len(set(relisted))
    assert rows[-1]['bad_images'] == len(relisted) >= len(listed)
    history = wd.read_jsonl('history.jsonl')
    assert [(r['event'], r.get('status')) for r in history] == [
        ('start', None),
        ('end', 'finished'),
        ('resume', None),
        ('end', 'finished'),
    ]
    assert history[2]['step'] == 4 and history[2]['changes'] == {'total_steps': [4, 8]}


# --------------------------------------------------------------------------- the progress line


def test_eta_comes_from_the_step_rate_after_compilation(monkeypatch):
    clock = iter([100.0, 160.0, 162.0, 164.0])  # created; step 1 after a 60 s compile; ...
    monkeypatch.setattr(metrics_lib.time, 'monotonic', lambda: next(clock))
    progress = metrics_lib.Progress(total_steps=101)
    line, rate = progress.line(1, {'loss': 1.0})
    assert line == 'step 1/101 loss=1.0000 (first step, with compilation: 60.0 s)' and rate == 0
    line, rate = progress.line(11, {'loss': 0.9})
    assert rate == 5.0 and line.endswith('5.00 steps/s ETA 0:00:18')  # 90 steps at 5/s
    line, rate = progress.line(21, {'loss': 0.8})
    assert rate == 5.0 and line.endswith('ETA 0:00:16')


# --------------------------------------------------------------------------- disk full, preemption


@pytest.mark.slow
def test_a_failed_save_stops_the_run_at_once_in_one_line(tmp_path):
    """Checkpoint files larger than the file-size limit (1 MB) fail to write, as on a full disk;
    SIGXFSZ ignored, the write fails with EFBIG."""
    workdir = tmp_path / 'run'
    limited = ['bash', '-c', 'trap "" XFSZ; ulimit -f 1000; exec "$0" "$@"', sys.executable]
    proc = subprocess.run(
        [
            *limited,
            '-m',
            'cmid_jax.main',
            SMOKE,
            f'--workdir={workdir}',
            '--config.total_steps=40',
            '--config.checkpoint_every_steps=1',
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == errors.EXIT_USER_ERROR, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-2]
    match = re.fullmatch(
        rf'Error: Saving the checkpoint of step (\d+) to {workdir}/ckpt failed: '
        r'File too large \(errno 27\); (the checkpoint of step (\d+) is intact|'
        r'no earlier checkpoint exists)',
        error,
    )
    assert match, error
    assert 'Traceback' not in proc.stderr and 'orbax' not in proc.stderr
    failed = int(match.group(1))
    logged = [json.loads(line)['step'] for line in open(workdir / 'metrics.jsonl')]
    assert logged[-1] <= failed + 1  # stopped at once, not at the end of the 40 steps
    assert str(failed) not in os.listdir(workdir / 'ckpt')
    if match.group(3):  # the newest intact checkpoint restores
        _, state, step = restore_train_state(str(workdir))
        assert step == int(match.group(3)) == int(state['step'])
    history = Workdir(workdir).read_jsonl('history.jsonl')
    assert history[-1]['status'].startswith(f'failed: Saving the checkpoint of step {failed}')


ORPHANED_WRITE = """
import asyncio, sys
from cmid_jax import errors

async def write():
    raise ValueError('OUT_OF_RANGE: Failed writing: File too large')

def main(argv):
    loop = asyncio.new_event_loop()
    task = loop.create_task(write())  # Its error is never retrieved, as orbax's are after a
    loop.run_until_complete(asyncio.sleep(0.01))  # failed save; asyncio logs it when collected.
    sys.modules[__name__].orphan = task
    raise errors.SaveError('Saving the checkpoint of step 2 failed: File too large', 'free space')

errors.run(main)
"""


def test_orphaned_write_errors_do_not_follow_the_one_line(tmp_path):
    """After a failed save, TensorStore writes that failed with it are collected at exit; asyncio
    logged each ("Task exception was never retrieved" and a traceback) after the error line."""
    proc = subprocess.run(
        [sys.executable, '-c', ORPHANED_WRITE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == errors.EXIT_USER_ERROR
    assert proc.stderr.splitlines() == [
        'Error: Saving the checkpoint of step 2 failed: File too large',
        f'  (free space; {errors.TRACEBACK_ENV}=1 shows the traceback)',
    ], proc.stderr


def test_closing_summary_names_steps_time_losses_knn_checkpoint_and_next_commands(tmp_path):
    wd = Workdir(tmp_path)
    for record in (
        {'step': 10, 'loss': 5.0, 'loss_mim': 0.5, 'loss_global': 2.0, 'loss_local': 2.5},
        {'step': 10, 'knn_top1_student': 0.25, 'knn_top1_teacher': 0.5},
        {'step': 10, 'dense_miou_student': 0.125},
    ):
        wd.append_jsonl('metrics.jsonl', record)
    for seconds, status in ((60.0, 'preempted'), (3600.5, 'finished')):
        wd.append_history('end', status=status, step=10, seconds=seconds)
    text = train.closing_summary(wd, smoke(total_steps=10, **{'eval.path': '/aid'}), 10)
    assert text.splitlines() == [
        'Run complete: step 10 of 10, 1:01:00 of wall time in 2 session(s); at step 10: '
        'loss=5.0000 loss_mim=0.5000 loss_global=2.0000 loss_local=2.5000.',
        'kNN top-1 at step 10: student 0.2500, teacher 0.5000.',
        'Dense probe at step 10: dense_miou_student 0.1250.',
        f'Checkpoint: {tmp_path}/ckpt/10',
        'Next:',
        f'  cmid-export --workdir={tmp_path} --out={tmp_path}/export/backbone.safetensors',
        f'  cmid-evaluate --workdir={tmp_path} --data=/aid',
    ]
