"""Exceptions of the data package. They cross grain worker processes, so they pickle."""

from __future__ import annotations


class ImageError(ValueError):
    """An image, scene or record could not be used. ``path`` and ``reason`` are attributes."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f'cannot read image {self.path!r}: {self.reason}')

    def __reduce__(self):  # keep picklable across grain worker processes
        return (type(self), (self.path, self.reason))


class TileRejected(Exception):
    """A readable tile or image with more nodata than ``data.max_nodata``: replaced, not counted as
    bad."""

    def __init__(self, where: str, fraction: float, limit: float):
        self.where = str(where)
        self.fraction = float(fraction)
        self.limit = float(limit)
        super().__init__(
            f'{self.where}: {self.fraction:.1%} nodata pixels, more than '
            f'data.max_nodata={self.limit:g}'
        )

    def __reduce__(self):
        return (type(self), (self.where, self.fraction, self.limit))
