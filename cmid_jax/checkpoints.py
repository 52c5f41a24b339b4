"""Orbax checkpoints of a run (ckpt/ of the workdir, `cmid_jax.workdir`): asynchronous saves whose
failures name the newest intact checkpoint, and restores that fall back past damaged ones.

`Workdir.checkpoints()` makes the `Checkpoints` of a workdir; this module knows the folders it is
given, not the workdir layout.
"""

from __future__ import annotations

import os
import re
import time

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from cmid_jax import parallel
from cmid_jax.errors import SaveError, WorkdirError, one_line, os_advice


class Checkpoints:
    """Orbax checkpoints of `{'state': train state, 'data': grain iterator}` under ckpt/.

    Saves are asynchronous; orbax writes each step to a temporary folder and renames it when
    complete, so an interrupted save is never restored. A save that fails (disk full,
    permissions, I/O) raises a `SaveError` naming the step, the reason and the newest intact
    checkpoint, at the next `save`, `check` or `wait`; orbax deletes old checkpoints
    (`keep`) only after a save completes, so the intact ones stay.
    """

    def __init__(
        self,
        directory: epath.Path,
        *,
        corrupt_directory: epath.Path,
        config_path: epath.Path,
        every_steps: int | None,
        keep: int | None,
        read_only: bool,
    ):
        self.directory = directory
        self.corrupt_directory = corrupt_directory  # where damaged checkpoints are moved
        self.config_path = config_path  # named when a checkpoint does not fit the config
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
        advice = os_advice(_errno(error), remote='://' in str(self.directory))
        return SaveError(
            f'Saving the checkpoint of step {step} to {self.directory} failed: '
            f'{_short_reason(error)}; {kept}',
            f'{advice}, then run the same command' + (' to resume' if intact else ''),
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
            parallel.sync_processes('cmid_jax_moved_damaged_checkpoints')
            self.manager.reload()
        if damaged and step is None:
            raise WorkdirError(
                f'No checkpoint in {self.directory} can be read: '
                + '; '.join(f'step {e.step}: {e.reason}' for e in damaged),
                (
                    'they were moved to ' + str(self.corrupt_directory) + '; the next run starts '
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
            f'resume with the config in {self.config_path}, or use a new workdir',
        )

    def _move_aside(self, damaged: DamagedCheckpoint) -> str:
        if jax.process_index() != 0:
            return 'process 0 moves it aside'
        stamp = time.strftime('%Y%m%d-%H%M%S')
        target = self.corrupt_directory / f'{damaged.step}-{stamp}'
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


def _errno(error: BaseException) -> int | None:
    """The errno of a failed system call, from an OSError or TensorStore's message; else None."""
    if isinstance(error, OSError) and error.errno:
        return error.errno
    found = re.search(r"os_error_code='?(\d+)", one_line(error))
    return int(found.group(1)) if found else None


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
