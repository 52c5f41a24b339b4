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
import re
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from cmid_jax.errors import SaveError, WorkdirError, one_line

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

    def __truediv__(self, name: str) -> epath.Path:
        return self.path / name

    def make(self) -> None:
        """Creates the folder; a WorkdirError if it cannot be written."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if self.is_local and not os.access(self.path, os.W_OK):
                raise PermissionError(13, 'Permission denied')
        except OSError as e:
            raise WorkdirError(
                f'Cannot write to the workdir {self} ({e.strerror or e})',
                'choose a writable folder with free space; nothing in it was changed',
            ) from e

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
            raise SaveError(
                f'Cannot write {path} ({e.strerror or e})',
                'free space or fix the permissions, then run again',
            ) from e

    def read_jsonl(self, name: str) -> list[dict]:
        """Every complete record of a JSONL file ([] if there is none)."""
        path = self / name
        if not path.exists():
            return []
        return _parse_jsonl(path.read_text())

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
        return Checkpoints(self, every_steps=every_steps, keep=keep, read_only=read_only)

    def has_checkpoints(self) -> bool:
        ckpt = self / CKPT
        return ckpt.is_dir() and any(True for _ in ckpt.iterdir())

    def remove_checkpoints(self) -> None:
        if (self / CKPT).exists():
            (self / CKPT).rmtree()


def _parse_jsonl(text: str) -> list[dict]:
    records = []
    for line in text.splitlines():
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


# --- Checkpoints --------------------------------------------------------------------------


class Checkpoints:
    """Orbax checkpoints of `{'state': train state, 'data': grain iterator}` under ckpt/.

    Saves are asynchronous; orbax writes each step to a temporary folder and renames it when
    complete, so an interrupted save is never restored. A save that fails (disk full,
    permissions, I/O) raises a `SaveError` naming the step, the reason and the newest intact
    checkpoint, at the next `save`, `check` or `wait`; orbax deletes old checkpoints
    (`keep`) only after a save completes, so the intact ones stay.
    """

    def __init__(
        self, workdir: Workdir, *, every_steps: int | None, keep: int | None, read_only: bool
    ):
        self.workdir = workdir
        self.directory = workdir / CKPT
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every_steps or 1,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        handlers = {
            'state': ocp.StandardCheckpointHandler(),
            'data': grain.checkpoint.CheckpointHandler(),
        }
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=handlers
            )
        except OSError as e:
            raise WorkdirError(
                f'Cannot use the checkpoint folder {self.directory} ({e.strerror or e})',
                'check the path and its permissions',
            ) from e
        self._in_flight: int | None = None

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    # --- Saving ----------------------------------------------------------------------------

    def save(self, step: int, state: dict, data_iterator=None, *, force: bool = False) -> bool:
        """Starts an asynchronous save (the data item only with an iterator)."""
        args = {'state': ocp.args.StandardSave(state)}
        if data_iterator is not None:
            args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        except Exception as e:  # pylint: disable=broad-except
            # Saving waits for the previous save first: its failure surfaces here.
            raise self._save_failed(self._in_flight or step, e) from e
        if saved:
            self._in_flight = step
        return saved

    def check(self) -> None:
        """Raises the SaveError of a background save that failed; cheap, never blocks."""
        if self._in_flight is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until the save in flight is complete; raises its SaveError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # pylint: disable=broad-except
            raise self._save_failed(self._in_flight, e) from e
        self._in_flight = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    def _save_failed(self, step: int | None, error: Exception) -> SaveError:
        self.manager.reload()
        intact = [s for s in self.steps() if s != step]
        kept = (
            f'the checkpoint of step {intact[-1]} is intact'
            if intact
            else 'no earlier checkpoint exists'
        )
        return SaveError(
            f'Saving the checkpoint of step {step} to {self.directory} failed: '
            f'{_short_reason(error)}; {kept}',
            'free space (or fix the permissions) and run the same command to resume'
            if intact
            else 'free space (or fix the permissions) and run the same command',
        )

    # --- Restoring -------------------------------------------------------------------------

    def restore(self, step: int, abstract_state, data_iterator=None) -> dict:
        """The train state of `step`, in `abstract_state`'s shapes and shardings; moves
        `data_iterator` in place when the checkpoint has a data item (import_torch's has none).

        Raises `DamagedCheckpoint` if the checkpoint cannot be read and a `WorkdirError` if it
        holds a state of other shapes than `abstract_state`.
        """
        self._check_fits(step, abstract_state)
        args = {'state': ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and (self.directory / str(step) / 'data').exists():
            args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**args))['state']
        except Exception as e:  # pylint: disable=broad-except
            raise DamagedCheckpoint(step, _short_reason(e)) from e

    def restore_newest(
        self, abstract_state, data_iterator=None, *, move_damaged: bool = False
    ) -> tuple[dict | None, int | None]:
        """(state, step) of the newest checkpoint that restores, (None, None) if there is none.

        A damaged newer checkpoint is skipped with a warning naming its step and what was wrong;
        with `move_damaged` (the training run; process 0 moves) it goes to ckpt_corrupt/.
        Raises a WorkdirError if there are checkpoints and none restores.
        """
        damaged = []
        state = step = None
        for candidate in reversed(self.steps()):
            try:
                state, step = self.restore(candidate, abstract_state, data_iterator), candidate
                break
            except DamagedCheckpoint as e:
                damaged.append(e)
        for e in damaged:
            where = self._move_aside(e) if move_damaged else 'left in place'
            logging.warning(
                'The checkpoint of step %d is damaged (%s): %s; %s.',
                e.step,
                e.reason,
                'skipped' if step is not None else 'no other checkpoint',
                where,
            )
        if move_damaged and damaged:
            _sync_processes('cmid_jax_moved_damaged_checkpoints')
            self.manager.reload()
        if damaged and step is None:
            raise WorkdirError(
                f'No checkpoint in {self.directory} can be read: '
                + '; '.join(f'step {e.step}: {e.reason}' for e in damaged),
                (
                    'they were moved to ' + str(self.workdir / CORRUPT) + '; the next run starts '
                    'from step 0'
                )
                if move_damaged
                else 'run cmid-pretrain to write a new one',
            )
        return state, step

    def _check_fits(self, step: int, abstract_state) -> None:
        try:
            tree = self.manager.item_metadata(step).get('state')
        except Exception as e:  # pylint: disable=broad-except
            raise DamagedCheckpoint(step, _short_reason(e)) from e
        if tree is None:
            raise DamagedCheckpoint(step, 'its state metadata (state/_METADATA) is missing')
        saved, wanted = _shapes(tree), _shapes(abstract_state)
        if saved == wanted:
            return
        diff = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
        shown = ', '.join(
            f'{k}: {saved.get(k, "absent")} saved, {wanted.get(k, "absent")} now' for k in diff[:3]
        )
        raise WorkdirError(
            f'The checkpoint of step {step} in {self.directory} holds a train state of other '
            f'shapes than this config builds ({len(diff)} differences; {shown})',
            f'resume with the config in {self.workdir / CONFIG}, or use a new workdir',
        )

    def _move_aside(self, damaged: DamagedCheckpoint) -> str:
        if jax.process_index() != 0:
            return 'process 0 moves it aside'
        stamp = time.strftime('%Y%m%d-%H%M%S')
        target = self.workdir / CORRUPT / f'{damaged.step}-{stamp}'
        target.parent.mkdir(parents=True, exist_ok=True)
        (self.directory / str(damaged.step)).rename(target)
        (target / 'REASON.txt').write_text(damaged.reason + '\n')
        return f'moved to {target}'


class DamagedCheckpoint(WorkdirError):
    """A checkpoint folder that does not restore: missing, truncated or undecodable files."""

    def __init__(self, step: int, reason: str):
        super().__init__(
            f'The checkpoint of step {step} cannot be read: {reason}',
            'restore another step (--step), or let cmid-pretrain fall back to an older one',
        )
        self.step, self.reason = step, reason


def _short_reason(error: BaseException) -> str:
    """The cause of an orbax / TensorStore error in a few words (their messages run to pages)."""
    text = one_line(error)
    os_error = re.search(r"os_error_code='?(\d+)", text)
    if os_error:  # TensorStore's form of a failed system call: disk full, permissions, ...
        return f'{os.strerror(int(os_error.group(1)))} (errno {os_error.group(1)})'
    text = text.split(' See full TensorStore details')[0].split(' [tensorstore_spec')[0]
    return text if len(text) <= 240 else text[:237] + '...'


def _shapes(tree) -> dict[str, tuple]:
    """{'a/0/m': shape} for every leaf: dict keys, attributes and indices all spelt alike, since
    orbax's metadata stores a NamedTuple (optax states) as a dict."""

    def name(key) -> str:
        for attr in ('key', 'name', 'idx'):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    return {
        '/'.join(name(k) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _sync_processes(name: str) -> None:
    """A barrier of all processes through JAX's coordination service (no device collective, so
    it never creates a communicator the train step's collectives would have to agree on)."""
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(ocp.multihost.unique_barrier_key(name))


def share_from_process_0(name: str, value: str | None) -> str:
    """`value` of process 0, on every process (through the coordination service's key-value
    store); `value` is ignored elsewhere."""
    if jax.process_count() == 1:
        return value
    client = ocp.multihost.get_jax_distributed_client()
    key = f'cmid_jax/{ocp.multihost.unique_barrier_key(name)}'
    if jax.process_index() == 0:
        client.key_value_set(key, value)
        return value
    return client.blocking_key_value_get(key, ocp.multihost.coordination_timeout() * 1000)
