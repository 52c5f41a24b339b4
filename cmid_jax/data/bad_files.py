"""Unreadable training inputs: each reported and counted once, across epochs and resumes.

The pipeline replaces an unreadable element by a random other one and passes its index back in
the batch (``bad_images``, :mod:`cmid_jax.data.pipeline`), also from grain worker processes. The
train loop hands those to :class:`BadFiles`, which logs each new file once with the reason, has
it recorded (``record``: one line of the workdir's bad_files.jsonl, which a resumed run loads
back), and stops the run when too large a share of the data read is bad.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np

from cmid_jax.data.pipeline import Source
from cmid_jax.errors import DataError

log = logging.getLogger(__name__)

# More bad elements than good ones among those read in this session: the data, not a few files,
# is broken (wrong folder, wrong data.bands, unmounted storage), and training on it is pointless.
MAX_BAD_SHARE = 0.5


class BadFiles:
    """The distinct unreadable elements of a run; `count` goes into the metrics as bad_images."""

    def __init__(self, source: Source, known: Iterable[dict], record: Callable[[dict], None]):
        self.source = source
        self._known = {r['file'] for r in known}
        self._record = record
        self._bad_read: set[str] = set()  # distinct bad elements met in this session
        self._good_read = 0  # elements decoded in this session

    @property
    def count(self) -> int:
        return len(self._known)

    def update(self, bad_images: np.ndarray, step: int) -> None:
        """Takes one batch's ``bad_images``; raises ValueError past MAX_BAD_SHARE."""
        bad_images = np.asarray(bad_images)
        self._good_read += bad_images.shape[0]
        for index in np.unique(bad_images[bad_images > 0] - 1):
            where = self.source.describe(int(index))
            self._bad_read.add(where)
            if where not in self._known:
                self._add(int(index), where, step)
        share = len(self._bad_read) / (len(self._bad_read) + self._good_read)
        if share > MAX_BAD_SHARE:
            raise DataError(
                f'{len(self._bad_read)} of the {len(self._bad_read) + self._good_read} '
                f'{self.source.unit} read so far are unreadable ({share:.0%}, more than '
                f'{MAX_BAD_SHARE:.0%}), e.g. {min(self._bad_read)}: check data.path and '
                f'data.bands (the list is in bad_files.jsonl)'
            )

    def _add(self, index: int, where: str, step: int) -> None:
        try:
            self.source.read(index)
            reason = 'failed in a data worker, reads now (intermittent storage?)'
        except Exception as e:  # pylint: disable=broad-except  # What the decoder said.
            reason = f'{type(e).__name__}: {e}'
        self._known.add(where)
        self._record({'file': where, 'index': index, 'step': step, 'reason': reason})
        log.warning(
            'Unreadable %s (%s): replaced by a random other one; %d so far, listed in '
            'bad_files.jsonl.',
            where,
            reason,
            self.count,
        )
