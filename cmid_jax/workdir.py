"""The run's workdir: the one owner of every file a run writes and reads.

    WORKDIR/
      config.json      the resolved config; compared with the config of a resumed run
      history.jsonl    one line per session start (new run, or resume: step, changed fields,
                       command line) and per session end (finished / preempted, seconds)
      metrics.jsonl    {"step": N, name: value, ...} per logged step
      eval.jsonl       one line per `cmid-evaluate` result
      bad_files.jsonl  every unreadable input, once (process 0; bad_files.process<k>.jsonl for
                       the other processes of a multi-host job)
      images/          reconstruction grids and the kNN curve
      ckpt/<step>/     orbax checkpoints: the train state and the grain iterator position
                       (`cmid_jax.checkpoints`, made by `Workdir.checkpoints()`)
      ckpt_corrupt/    damaged checkpoints moved aside by a resuming run, with REASON.txt
      lock             host and pid of the live run (`cmid_jax.workdir_lock`)
      import.json      written by `cmid_jax.convert.import_torch`
      tensorboard/     event files, when TensorFlow is installed

Every path is an `etils.epath.Path`, so a workdir can be local or remote (`gs://bucket/run`,
`s3://...`, through fsspec or TensorFlow's gfile): orbax writes the checkpoints there itself.

JSONL files never lose a line. Locally each record is one `write` on an O_APPEND descriptor, so a
killed process leaves whole lines only and a training run and `cmid-evaluate` never interleave.
Object stores cannot append: a remote JSONL file is read when opened and rewritten whole (earlier
lines + new ones) by `flush()`, which the train loop calls at every checkpoint save, and which
also runs at most every `REMOTE_FLUSH_SECONDS` and at close. An object is replaced atomically, so
a crash leaves the last complete version, missing only lines logged after the last checkpoint,
which the resumed run logs again. (Two processes rewriting the same remote file at once would
race; the workdir lock keeps a second run out, and `cmid-evaluate` rewrites eval.jsonl only.)
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

import ml_collections
from etils import epath

from cmid_jax.checkpoints import Checkpoints
from cmid_jax.errors import SaveError, WorkdirError, from_os_error

CONFIG = 'config.json'
HISTORY = 'history.jsonl'
METRICS = 'metrics.jsonl'
EVAL = 'eval.jsonl'
BAD_FILES = 'bad_files.jsonl'
IMAGES = 'images'
CKPT = 'ckpt'
CORRUPT = 'ckpt_corrupt'
LOCK = 'lock'
IMPORT = 'import.json'
TENSORBOARD = 'tensorboard'

REMOTE_FLUSH_SECONDS = 60.0


class Workdir:
    """A local or remote run folder; see the module docstring for its layout."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        self.is_local = '://' not in path
        self.path = epath.Path(os.path.abspath(path) if self.is_local else path)

    def __str__(self) -> str:
        return os.fspath(self.path)

    @property
    def name(self) -> str:
        """The folder's own name (the last component of its path)."""
        return self.path.name

    def __truediv__(self, name: str) -> epath.Path:
        return self.path / name

    def make(self) -> None:
        """Creates the folder; a WorkdirError if it cannot be written."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if self.is_local and not os.access(self.path, os.W_OK):
                raise PermissionError(13, 'Permission denied')
        except OSError as e:
            raise from_os_error(e, f'Cannot write to the workdir {self}') from e

    # --- JSON files ------------------------------------------------------------------------

    def has_config(self) -> bool:
        return (self / CONFIG).exists()

    def read_config(self) -> ml_collections.ConfigDict:
        """The resolved config a run wrote to config.json."""
        if not self.has_config():
            raise WorkdirError(
                f'{self / CONFIG} not found: {self} is not a cmid_jax workdir',
                'run cmid-pretrain or cmid-import-torch there first',
            )
        return ml_collections.ConfigDict(self.read_json(CONFIG))

    def write_config(self, config: ml_collections.ConfigDict) -> None:
        self.make()
        self.write_text(CONFIG, config.to_json_best_effort(indent=2))

    def read_json(self, name: str) -> Any:
        return json.loads((self / name).read_text())

    def write_json(self, name: str, value: Any) -> None:
        self.write_text(name, json.dumps(value, indent=2))

    def write_text(self, name: str, text: str) -> None:
        """Writes a whole file atomically: a crash leaves the old file or the new one."""
        path = self / name
        try:
            if self.is_local:
                tmp = path.with_name(path.name + '.tmp')
                tmp.write_text(text)
                os.replace(tmp, path)
            else:  # An object upload replaces the object only when complete.
                path.write_text(text)
        except OSError as e:
            raise from_os_error(e, f'Cannot write {path}', SaveError) from e

    def read_jsonl(self, name: str) -> list[dict]:
        """Every complete record of a JSONL file ([] if there is none)."""
        path = self / name
        if not path.exists():
            return []
        return read_jsonl_file(path)

    def jsonl(self, name: str) -> JsonlFile:
        self.make()
        return JsonlFile(self / name, local=self.is_local)

    def append_jsonl(self, name: str, record: Mapping[str, Any]) -> None:
        writer = self.jsonl(name)
        try:
            writer.write(record)
        finally:
            writer.close()

    def append_history(self, event: str, **fields: Any) -> None:
        """One history.jsonl line: what happened, when, where and by which command."""
        self.append_jsonl(
            HISTORY,
            {
                'event': event,
                'time': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
                'host': socket.gethostname(),
                'pid': os.getpid(),
                **fields,
                'argv': sys.argv,
            },
        )

    # --- Folders ---------------------------------------------------------------------------

    def images_dir(self) -> epath.Path:
        return self / IMAGES

    def checkpoints(
        self, *, every_steps: int | None = None, keep: int | None = None, read_only: bool = False
    ) -> Checkpoints:
        return Checkpoints(
            self / CKPT,
            corrupt_directory=self / CORRUPT,
            config_path=self / CONFIG,
            every_steps=every_steps,
            keep=keep,
            read_only=read_only,
        )

    def has_checkpoints(self) -> bool:
        ckpt = self / CKPT
        return ckpt.is_dir() and any(True for _ in ckpt.iterdir())

    def remove_checkpoints(self) -> None:
        if (self / CKPT).exists():
            (self / CKPT).rmtree()


def read_jsonl_file(path: str | os.PathLike) -> list[dict]:
    """Every complete record of the JSONL file at `path` (local or remote), in file order; a line
    that does not parse (cut by a crash) is skipped. For the workdir's own files use
    `Workdir.read_jsonl`, which also reads a missing file as []."""
    records = []
    for line in epath.Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # A line cut by a crash before O_APPEND existed here.
            continue
    return records


class JsonlFile:
    """Appends one JSON object per `write`; see the module docstring for local vs remote."""

    def __init__(self, path: epath.Path, *, local: bool):
        self.path, self.local = path, local
        self._fd = None  # Local: opened by the first write, so no empty file is left behind.
        self._pending: list[str] = []
        if not local:
            self._text = path.read_text() if path.exists() else ''
            if self._text and not self._text.endswith('\n'):
                self._text += '\n'
            self._flushed_at = time.monotonic()

    def write(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record) + '\n'
        if self.local:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(self._fd, line.encode())
            return
        self._pending.append(line)
        if time.monotonic() - self._flushed_at > REMOTE_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Makes every line written so far durable (a no-op locally: each write already is)."""
        if self.local or not self._pending:
            return
        text = self._text + ''.join(self._pending)
        self.path.write_text(text)
        self._text, self._pending, self._flushed_at = text, [], time.monotonic()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.flush()
