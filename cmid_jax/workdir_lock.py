"""WORKDIR/lock: one run at a time writes to a workdir.

The processes of one multi-host job share the workdir legitimately: process 0 holds the lock.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid

from absl import logging

from cmid_jax.errors import SaveError, WorkdirError
from cmid_jax.workdir import LOCK, Workdir


class WorkdirLock:
    """WORKDIR/lock, held by the one run (process 0 of a multi-host job) that writes there.

    The file records the holder's host, pid, boot id and process start time, plus a heartbeat
    that a background thread refreshes every `HEARTBEAT_SECONDS`. A lock is stale, and taken
    over with a warning, when its process is dead (same host: the pid is gone, or now belongs to
    a process started at another time; the machine rebooted) or, from another host, when its
    heartbeat is older than `STALE_SECONDS`. Creation is atomic locally (O_EXCL); remotely the
    file is written and read back, so of two runs racing for it the second sees the first.
    """

    HEARTBEAT_SECONDS = 60.0
    STALE_SECONDS = 600.0

    def __init__(self, workdir: Workdir):
        self.workdir = workdir
        self.path = workdir / LOCK
        self.token = uuid.uuid4().hex
        self._started = _iso(time.time())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Takes the lock or raises a WorkdirError naming the live holder."""
        self.workdir.make()
        if not self._create():
            holder = self._read()
            if holder is not None and _alive(holder, self.STALE_SECONDS):
                raise WorkdirError(
                    f'The workdir {self.workdir} is in use by another run (host '
                    f'{holder.get("host")}, pid {holder.get("pid")}, started '
                    f'{holder.get("started")})',
                    'wait for it to finish, stop it, or use another --workdir',
                )
            logging.warning(
                'Taking over the stale lock of %s (%s).', self.workdir, _describe(holder)
            )
            self._write()
            if (self._read() or {}).get('token') != self.token:
                raise WorkdirError(
                    f'Another run took the lock of {self.workdir} at the same moment',
                    'run one process per workdir',
                )
        self._thread = threading.Thread(target=self._heartbeat, name='workdir-lock', daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if (self._read() or {}).get('token') == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _record(self) -> dict:
        return {
            'host': socket.gethostname(),
            'pid': os.getpid(),
            'boot_id': _boot_id(),
            'process_start': _process_start(os.getpid()),
            'token': self.token,
            'started': self._started,
            'heartbeat': time.time(),
            'argv': sys.argv,
        }

    def _create(self) -> bool:
        if not self.workdir.is_local:
            if self.path.exists():
                return False
            self._write()
            return (self._read() or {}).get('token') == self.token
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, 'w') as f:
            json.dump(self._record(), f)
        return True

    def _write(self) -> None:
        self.workdir.write_text(LOCK, json.dumps(self._record()))

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):  # Gone, or cut by a crash while being written.
            return None

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_SECONDS):
            if (self._read() or {}).get('token') != self.token:
                logging.error('The lock of %s was taken by another run.', self.workdir)
                return
            try:
                self._write()
            except SaveError as e:  # A full disk is reported by the checkpoint save.
                logging.warning('Could not refresh the lock: %s', e.message)


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).astimezone().isoformat(timespec='seconds')


def _describe(holder: dict | None) -> str:
    if holder is None:
        return 'unreadable lock file'
    return f'host {holder.get("host")}, pid {holder.get("pid")}, started {holder.get("started")}'


def _alive(holder: dict, stale_seconds: float) -> bool:
    """Whether the process that wrote `holder` may still be running."""
    if holder.get('host') != socket.gethostname() or holder.get('boot_id') != _boot_id():
        return time.time() - float(holder.get('heartbeat', 0)) < stale_seconds
    pid = int(holder.get('pid', -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Someone else's live process.
        pass
    started = _process_start(pid)
    return started is None or holder.get('process_start') in (None, started)


def _boot_id() -> str | None:
    try:
        with open('/proc/sys/kernel/random/boot_id', encoding='ascii') as f:
            return f.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f'/proc/{pid}/stat', encoding='ascii') as f:
            return int(f.read().rsplit(')', 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
