"""The project's errors, and the one way every command reports them.

Every command (`cmid_jax.main`, `cmid_jax/tools/*.py`) starts through `run(main)`:

* an expected error (a `UserError`: config, paths, data, workdir, incompatible resume, lock,
  failed save, a diverged run; or a flag that does not parse, a misspelt `--config.FIELD`, a
  missing config file) prints one line and a hint, without a traceback, and exits with status 2;
* a preempted run (`Preempted`: SIGTERM, state saved) exits with status 75 (EX_TEMPFAIL), so
  schedulers and retry loops run the same command again;
* anything else is a bug: Python's traceback and status 1.

Only the project's own error types are expected. A library's error is translated where it is
raised, into the type and hint that fit its cause (`from_os_error`: disk full, permissions, a
missing path, the network); a `ValueError` from a bug stays a traceback.

`CMID_TRACEBACK=1` shows the traceback of expected errors too. Library INFO chatter (orbax's
per-save lines, JAX's `Unable to initialize backend 'tpu'`) is kept out of every command's log.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import functools
import os
import sys
from collections.abc import Callable, Iterator

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL in sysexits.h: "try again later".
TRACEBACK_ENV = 'CMID_TRACEBACK'
_HINT_TRACEBACK = f'{TRACEBACK_ENV}=1 shows the traceback'


class UserError(Exception):
    """An error the user can fix: printed as one line plus a hint, exit status 2."""

    def __init__(self, message: str, hint: str = ''):
        super().__init__(message)
        self.message, self.hint = message, hint

    def __reduce__(self):  # Keeps the hint across grain's worker processes.
        return (type(self), (self.message, self.hint))


class ConfigError(UserError, ValueError):
    """A config value that cannot work, alone or with the others."""


class DataError(UserError, ValueError):
    """Training data that cannot be found or read."""


class WorkdirError(UserError):
    """A workdir that cannot be used as asked: locked, incompatible, missing files."""


class SaveError(UserError):
    """A checkpoint (or another workdir file) could not be written."""


class Diverged(UserError, FloatingPointError):
    """Training stopped on non-finite losses or gradients (`max_nonfinite_steps`)."""


class ImageError(DataError):
    """An image, scene or record that cannot be used; `path` and `reason` are attributes. The
    pipeline counts and replaces it; it stops a run only where no image can replace it."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = str(path), str(reason)
        super().__init__(f'cannot read image {self.path!r}: {self.reason}')

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


class TileRejected(Exception):
    """A readable tile or image with more nodata than `data.max_nodata`: replaced, not counted as
    bad (control flow of the pipeline, never reported)."""

    def __init__(self, where: str, fraction: float, limit: float):
        self.where, self.fraction, self.limit = str(where), float(fraction), float(limit)
        super().__init__(
            f'{self.where}: {self.fraction:.1%} nodata pixels, more than '
            f'data.max_nodata={self.limit:g}'
        )

    def __reduce__(self):
        return (type(self), (self.where, self.fraction, self.limit))


class Preempted(Exception):
    """The run received SIGTERM, saved its state and stopped; exit status 75."""

    def __init__(self, step: int, workdir: str):
        super().__init__(
            f'Preempted (SIGTERM): saved the checkpoint of step {step} in '
            f'{workdir}; run the same command to resume.'
        )
        self.step = step


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (a Python traceback inside it reduced to its end)."""
    text = str(error).strip()
    if text[:1] in '\'"' and text[:1] == text[-1:]:  # A KeyError's message is a repr.
        with contextlib.suppress(ValueError, SyntaxError):
            text = str(ast.literal_eval(text))
    if 'Traceback (most recent call last)' in text:  # absl wraps config-file errors this way.
        text = text.splitlines()[-1]
    return ' '.join(part.strip() for part in text.splitlines() if part.strip())


@contextlib.contextmanager
def hint(text: str) -> Iterator[None]:
    """Adds `text` as the hint of a project error raised inside that has none (a tool's advice
    on which flag to check). Other exceptions pass unchanged."""
    try:
        yield
    except UserError as e:
        if not e.hint:
            e.hint = text
        raise


# errno -> (what happened, what to do), for OSErrors of files the user named or a workdir.
_OS_CAUSES = {
    errno.ENOSPC: ('no space left', 'free space, or use a --workdir on a larger disk'),
    errno.EDQUOT: ('disk quota exceeded', 'free space, or use a --workdir on a larger disk'),
    errno.EFBIG: ('file too large for this file system', 'use a --workdir on another disk'),
    errno.EACCES: ('permission denied', 'fix the permissions, or use another path'),
    errno.EPERM: ('operation not permitted', 'fix the permissions, or use another path'),
    errno.EROFS: ('read-only file system', 'use a writable path'),
    errno.ENOENT: ('no such file or directory', 'check the path'),
    errno.ENOTDIR: ('a part of the path is not a folder', 'check the path'),
    errno.EISDIR: ('is a folder', 'check the path'),
}
_NETWORK_HINT = 'check the network and the storage service (gs://: the bucket and credentials)'


def os_advice(code: int | None, *, remote: bool = False) -> str:
    """What to do about a failed system call with errno `code` (None: unknown). On remote storage
    (gs://) an error without an errno is the network's or the service's."""
    if code in _OS_CAUSES:
        return _OS_CAUSES[code][1]
    return _NETWORK_HINT if remote else 'check the disk and the path'


def from_os_error(error: OSError, what: str, kind: type[UserError] = WorkdirError) -> UserError:
    """`error` (raised while doing `what`, e.g. "writing runs/x/config.json") as a project error
    of `kind` whose hint fits its cause: disk full, permissions, a missing path or the network."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return kind(f'{what}: {one_line(error) or type(error).__name__}', _NETWORK_HINT)
    cause = _OS_CAUSES.get(error.errno, (None, ''))[0]
    detail = error.strerror or cause or one_line(error) or type(error).__name__
    return kind(f'{what}: {detail}', os_advice(error.errno, remote='://' in what))


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)` with the error reporting, exit codes and log filters above."""
    from absl import app  # pylint: disable=import-outside-toplevel

    app.run(functools.partial(_run_main, main), flags_parser=_parse_flags)


def _show_tracebacks() -> bool:
    return os.environ.get(TRACEBACK_ENV, '') not in ('', '0')


def _fail(message: str, hint: str, status: int = EXIT_USER_ERROR) -> None:
    import logging  # pylint: disable=import-outside-toplevel

    # After a failed save, TensorStore futures that hold the same write error are collected at
    # exit and asyncio logs each as "Task exception was never retrieved": the error is the
    # line below, once.
    logging.getLogger('asyncio').disabled = not _show_tracebacks()
    hints = '; '.join(h for h in (hint, _HINT_TRACEBACK) if h)
    sys.stderr.write(f'Error: {message}\n  ({hints})\n')
    sys.stderr.flush()
    sys.exit(status)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every failure (including config files) as one line."""
    from absl import flags  # pylint: disable=import-outside-toplevel
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        _fail(one_line(e), 'pass --helpshort to list the flags')
    except (AttributeError, KeyError) as e:  # `--config.FIELD=...` naming no field.
        if _show_tracebacks():
            raise
        _fail(f'unknown config field: {one_line(e)}', 'see the config reference in README.md')
    except (TypeError, ValueError, OSError) as e:
        if _show_tracebacks():
            raise
        _fail(one_line(e), 'pass --helpshort to list the flags')
    for name in flags.FLAGS:
        flag = flags.FLAGS[name]
        if flag.value is None or not hasattr(flag, 'config_filename'):
            continue
        try:  # A config file that failed to load raises on first use.
            _ = flag.value.keys
        except OSError as e:
            if _show_tracebacks():
                raise
            path = config_flags.get_config_filename(flag).split(':', 1)[0]
            message = (
                f'config file {path!r} (--{name}) not found'
                if not os.path.exists(path)
                else f'config file {path!r} (--{name}) does not load: {one_line(e)}'
            )
            _fail(message, 'the configs are in configs/, e.g. --config=configs/vitb.py:smoke')
    return rest


def _run_main(main: Callable[[list[str]], None], argv: list[str]) -> None:
    _quiet_library_logs()
    try:
        main(argv)
    except Preempted as e:
        from absl import logging  # pylint: disable=import-outside-toplevel

        logging.warning('%s', e)
        sys.exit(EXIT_PREEMPTED)
    except UserError as e:
        if _show_tracebacks():
            raise
        _fail(e.message, e.hint)


def _quiet_library_logs() -> None:
    from absl import logging  # pylint: disable=import-outside-toplevel

    logging.get_absl_handler().addFilter(_LibraryChatter(_show_tracebacks()))
    if not _show_tracebacks():
        sys.unraisablehook = functools.partial(_drop_closed_loop_callbacks, sys.unraisablehook)


def _drop_closed_loop_callbacks(default: Callable, unraisable) -> None:
    """After a background save fails, orbax closes its event loop while TensorStore is still
    completing the other writes; each completion then reports 'Event loop is closed' (dozens of
    tracebacks). The failure itself is reported once, as a SaveError."""
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
        default(unraisable)


class _LibraryChatter:
    """Drops orbax's INFO lines, its notes on read-only use (export and evaluation restore
    read-only on purpose) and background-thread tracebacks (a failed save is reported as one
    `SaveError` line instead), and JAX's note that there is no TPU."""

    _READ_ONLY_NOTES = ('Given directory is read only', 'CheckpointManagerOptions.read_only=True')

    def __init__(self, keep_tracebacks: bool):
        self.keep_tracebacks = keep_tracebacks

    def filter(self, record) -> bool:
        import logging  # pylint: disable=import-outside-toplevel

        if '/orbax/' in record.pathname:
            if record.levelno < logging.WARNING or record.getMessage().startswith(
                self._READ_ONLY_NOTES
            ):
                return False
            return self.keep_tracebacks or not record.exc_info
        return not (
            record.levelno < logging.WARNING
            and record.getMessage().startswith('Unable to initialize backend')
        )
