"""cmid_jax.workdir: files through epath (local and a non-local filesystem), the lock, and
checkpoints that fall back from damage and report failed saves."""

import glob
import json
import os
import socket
import subprocess
import sys

import fsspec
import jax
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem

from cmid_jax import checkpoints as checkpoints_lib
from cmid_jax import errors, visualize, workdir_lock
from cmid_jax.workdir import EVAL, HISTORY, METRICS, Workdir
from cmid_jax.workdir_lock import WorkdirLock
from configs import vitb

from conftest import REPO

# --------------------------------------------------------------------------- remote workdir


class InMemoryGcs(MemoryFileSystem):
    """fsspec's in-memory filesystem answering for gs://, standing in for gcsfs: objects are
    written whole on close and have no append, like GCS objects."""

    protocol = ('gs', 'gcs')
    store: dict = {}
    pseudo_dirs = ['']

    @classmethod
    def _strip_protocol(cls, path):
        for prefix in ('gs://', 'gcs://'):
            if path.startswith(prefix):
                path = path[len(prefix) :]
        return super()._strip_protocol(path)

    def open(self, path, mode='rb', **kwargs):
        if 'a' in mode:
            raise NotImplementedError('object stores cannot append')
        return super().open(path, mode, **kwargs)


@pytest.fixture
def gcs(monkeypatch):
    """gs:// paths go through epath's fsspec backend into InMemoryGcs (never to the network)."""
    for protocol in InMemoryGcs.protocol:
        fsspec.register_implementation(protocol, InMemoryGcs, clobber=True)
    monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)  # TF would route to gfile.
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    InMemoryGcs.store.clear()
    yield InMemoryGcs.store
    InMemoryGcs.store.clear()
    epath_backend.fsspec_backend._get_filesystem.cache_clear()


def test_remote_workdir_round_trips_every_file(gcs):
    wd = Workdir('gs://bucket/runs/a')
    assert not wd.is_local and str(wd) == 'gs://bucket/runs/a'
    config = vitb.get_config('smoke')
    wd.write_config(config)
    assert wd.read_config().to_dict() == json.loads(config.to_json_best_effort())
    assert '/bucket/runs/a/config.json' in gcs  # really in the (fake) bucket

    wd.append_history('start', step=0, changes={})
    wd.append_history('resume', step=5, changes={'total_steps': [10, 20]})
    history = wd.read_jsonl(HISTORY)
    assert [(r['event'], r['step']) for r in history] == [('start', 0), ('resume', 5)]
    assert wd.read_jsonl(HISTORY)[1]['changes'] == {'total_steps': [10, 20]}
    assert wd.read_jsonl(HISTORY)[0]['host'] == socket.gethostname()

    for k in range(3):  # cmid-evaluate appends one line per result
        wd.append_jsonl(EVAL, {'protocol': 'knn', 'which': 'student', 'step': k, 'top1': k / 10})
    assert [r['step'] for r in wd.read_jsonl(EVAL)] == [0, 1, 2]

    metrics = wd.jsonl(METRICS)
    metrics.write({'step': 1, 'knn_top1_student': 0.5})
    metrics.write({'step': 2, 'knn_top1_student': 0.6})
    metrics.flush()  # what the train loop does at every checkpoint save
    metrics.write({'step': 3, 'knn_top1_student': 0.7})  # then the process dies: never flushed
    del metrics
    assert [r['step'] for r in wd.read_jsonl(METRICS)] == [1, 2]  # earlier lines kept
    resumed = wd.jsonl(METRICS)  # the resumed run logs step 3 again
    resumed.write({'step': 3, 'knn_top1_student': 0.7})
    resumed.close()
    assert [r['step'] for r in wd.read_jsonl(METRICS)] == [1, 2, 3]

    visualize.save_png(wd.images_dir() / 'grid.png', np.zeros((4, 6, 3), np.uint8))
    series = visualize.plot_knn_curve(wd / METRICS, wd.images_dir() / 'knn.png')
    assert series == {'knn_top1_student': [(1, 0.5), (2, 0.6), (3, 0.7)]}
    assert {'/bucket/runs/a/images/grid.png', '/bucket/runs/a/images/knn.png'} <= gcs.keys()
    assert (wd.images_dir() / 'grid.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    with WorkdirLock(wd):  # the lock works on an object store too
        assert wd.read_json('lock')['pid'] == os.getpid()
        with pytest.raises(errors.WorkdirError, match=f'pid {os.getpid()}'):
            WorkdirLock(wd).acquire()
    assert not (wd / 'lock').exists()


def test_plots_skip_a_metrics_line_cut_by_a_crash(tmp_path):
    """The pictures read metrics.jsonl through the workdir's reader, as the train loop does."""
    wd = Workdir(tmp_path)
    metrics = wd.jsonl(METRICS)
    for step, loss in ((1, 2.0), (2, 1.5)):
        metrics.write({'step': step, 'loss': loss, 'knn_top1_student': 0.1 * step})
    metrics.close()
    with open(wd / METRICS, 'a', encoding='utf-8') as f:
        f.write('{"step": 3, "loss": 1.')  # killed in the middle of a line
    assert [r['step'] for r in wd.read_jsonl(METRICS)] == [1, 2]
    series = visualize.plot_training_curves(wd / METRICS, tmp_path / 'curves.png', names=('loss',))
    assert series == {'loss': [(1, 2.0), (2, 1.5)]}
    series = visualize.plot_knn_curve(wd / METRICS, tmp_path / 'knn.png')
    assert series == {'knn_top1_student': [(1, 0.1), (2, 0.2)]}
    assert (tmp_path / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_local_jsonl_writers_interleave_whole_lines(tmp_path):
    wd = Workdir(tmp_path)
    a, b = wd.jsonl(METRICS), wd.jsonl(METRICS)
    assert not (tmp_path / METRICS).exists()  # nothing is created before the first line
    for i in range(50):
        a.write({'step': i, 'who': 'a', 'pad': 'x' * 300})
        b.write({'step': i, 'who': 'b'})
    a.close(), b.close()
    lines = (tmp_path / METRICS).read_text().splitlines()
    assert len(lines) == 100 and all(json.loads(line)['step'] >= 0 for line in lines)


def test_read_config_of_a_folder_that_is_no_workdir(tmp_path):
    with pytest.raises(errors.WorkdirError, match='config.json not found'):
        Workdir(tmp_path).read_config()


# --------------------------------------------------------------------------- lock


def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, '-c', 'import os; print(os.getpid())'],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout)


def write_lock(tmp_path, **fields):
    record = {
        'host': socket.gethostname(),
        'pid': os.getpid(),
        'boot_id': workdir_lock._boot_id(),
        'process_start': workdir_lock._process_start(os.getpid()),
        'started': '2026-01-01T00:00:00',
        'heartbeat': 0.0,
        'token': 'theirs',
        **fields,
    }
    (tmp_path / 'lock').write_text(json.dumps(record))


def test_a_live_lock_refuses_with_host_and_pid(tmp_path):
    wd = Workdir(tmp_path)
    with WorkdirLock(wd):
        with pytest.raises(errors.WorkdirError) as e:
            WorkdirLock(Workdir(tmp_path)).acquire()
    assert str(tmp_path) in e.value.message
    assert f'host {socket.gethostname()}, pid {os.getpid()}' in e.value.message
    assert not (tmp_path / 'lock').exists()  # released


@pytest.mark.parametrize(
    'holder',
    [
        {'pid': 'dead'},  # the process is gone
        {'process_start': -1},  # the pid now belongs to another process (a restarted container)
        {'boot_id': 'another boot'},  # the machine rebooted (heartbeat 0: long ago)
        {'host': 'elsewhere', 'heartbeat': 0.0},  # another host stopped refreshing it
    ],
)
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, holder, caplog):
    if holder.get('pid') == 'dead':
        holder['pid'] = dead_pid()
    write_lock(tmp_path, **holder)
    lock = WorkdirLock(Workdir(tmp_path))
    with caplog.at_level('WARNING'):
        lock.acquire()
    assert 'Taking over the stale lock' in caplog.text
    assert json.loads((tmp_path / 'lock').read_text())['token'] == lock.token
    lock.release()


def test_another_hosts_fresh_heartbeat_keeps_the_lock(tmp_path):
    import time

    write_lock(tmp_path, host='elsewhere', pid=4242, heartbeat=time.time())
    with pytest.raises(errors.WorkdirError, match='host elsewhere, pid 4242'):
        WorkdirLock(Workdir(tmp_path)).acquire()


# --------------------------------------------------------------------------- checkpoints


def tiny_state(step: int) -> dict:
    """Random values (they do not compress) in data files of orbax's OCDBT store."""
    w = np.random.default_rng(step).normal(size=(64, 512)).astype(np.float32)
    return {'w': w, 'step': np.int32(step)}


def abstract(state) -> dict:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sharding), state
    )


def save_steps(wd, steps):
    ckpt = wd.checkpoints(every_steps=1, keep=5)
    for step in steps:
        ckpt.save(step, tiny_state(step), force=True)
    ckpt.close()


def truncate_largest_data_file(step_dir):
    largest = max(glob.glob(f'{step_dir}/state/ocdbt.process_0/d/*'), key=os.path.getsize)
    with open(largest, 'r+b') as f:
        f.truncate(os.path.getsize(largest) // 2)


DAMAGE = {
    'truncated data file': truncate_largest_data_file,
    'deleted data file': lambda d: os.remove(
        max(glob.glob(f'{d}/state/ocdbt.process_0/d/*'), key=os.path.getsize)
    ),
    'empty manifest': lambda d: open(f'{d}/state/manifest.ocdbt', 'w').close(),
    'deleted _METADATA': lambda d: os.remove(f'{d}/state/_METADATA'),
}


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_restore_falls_back_from_a_damaged_newest_checkpoint(tmp_path, damage, caplog):
    wd = Workdir(tmp_path)
    save_steps(wd, [1, 2, 3])
    DAMAGE[damage](tmp_path / 'ckpt' / '3')
    ckpt = wd.checkpoints(every_steps=1, keep=5)
    with caplog.at_level('WARNING'):
        state, step = ckpt.restore_newest(abstract(tiny_state(0)), move_damaged=True)
    ckpt.close()
    assert step == 2 and np.array_equal(state['w'], tiny_state(2)['w'])
    assert 'The checkpoint of step 3 is damaged' in caplog.text
    moved = glob.glob(str(tmp_path / 'ckpt_corrupt' / '3-*'))
    assert len(moved) == 1 and os.path.isdir(moved[0])  # moved aside, not deleted
    assert open(os.path.join(moved[0], 'REASON.txt')).read().strip()
    assert sorted(os.listdir(tmp_path / 'ckpt')) == ['1', '2']


def test_read_only_restore_skips_damage_without_moving_it(tmp_path):
    wd = Workdir(tmp_path)
    save_steps(wd, [1, 2])
    truncate_largest_data_file(tmp_path / 'ckpt' / '2')
    ckpt = wd.checkpoints(read_only=True)
    _, step = ckpt.restore_newest(abstract(tiny_state(0)))
    assert step == 1 and os.path.isdir(tmp_path / 'ckpt' / '2')
    with pytest.raises(checkpoints_lib.DamagedCheckpoint, match='step 2 cannot be read'):
        ckpt.restore(2, abstract(tiny_state(0)))


def test_a_state_of_other_shapes_is_an_error_not_damage(tmp_path):
    wd = Workdir(tmp_path)
    save_steps(wd, [1])
    other = abstract({'w': np.zeros((64, 256), np.float32), 'step': np.int32(0)})
    with pytest.raises(
        errors.WorkdirError,
        match=r'other shapes .* w: \(64, 512\) saved, '
        r'\(64, 256\) now',
    ):
        wd.checkpoints(every_steps=1, keep=5).restore_newest(other, move_damaged=True)
    assert os.listdir(tmp_path / 'ckpt') == ['1'] and not (tmp_path / 'ckpt_corrupt').exists()


SAVE_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
import numpy as np
from cmid_jax.errors import SaveError
from cmid_jax.workdir import Workdir
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
ckpt = Workdir(sys.argv[1]).checkpoints(every_steps=1, keep=1)
ckpt.save(1, {'w': np.ones(1000, np.float32)})
ckpt.wait()
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
big = np.random.default_rng(0).normal(size=1_000_000).astype(np.float32)
try:
    ckpt.save(2, {'w': big})  # a 4 MB data file: cannot be written
    ckpt.wait()
    print('saved')
except SaveError as e:
    print(e.message)
"""


def test_a_failed_save_names_the_step_the_reason_and_the_intact_checkpoint(tmp_path):
    """A real I/O error (file size limit, as a full disk) in orbax's background write."""
    out = subprocess.run(
        [sys.executable, '-c', SAVE_UNDER_A_FILE_SIZE_LIMIT, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith(f'Saving the checkpoint of step 2 to {tmp_path}/ckpt failed: ')
    assert 'File too large' in out.stdout
    assert out.stdout.strip().endswith('the checkpoint of step 1 is intact')
    ckpt = Workdir(tmp_path).checkpoints(read_only=True)  # keep=1 did not delete it
    state = ckpt.restore(1, abstract({'w': np.ones(1000, np.float32)}))
    assert ckpt.steps() == [1] and np.all(np.asarray(state['w']) == 1)
