"""Training tiles cut on the fly from image scenes of any size (``data.tile_size = N > 0``).

The tile index is built once, from the file headers only (no pixels): every scene of at least
N x N pixels is covered by a grid of N x N windows, ``ceil(H / N)`` rows by ``ceil(W / N)``
columns, spread evenly from the first to the last pixel (non-overlapping when N divides the side;
otherwise neighbouring windows overlap by less than N pixels, so no pixel is left out). The
elements of the dataset are these (scene, window) entries, in file order and row-major within a
scene, so they shuffle, batch, split across processes and resume like files do.

A window is read with a windowed GDAL read (:mod:`cmid_jax.data.raster`), never the whole scene.
A window with more than ``max_nodata`` of nodata pixels (:func:`cmid_jax.data.bands.valid_mask`)
raises :class:`~cmid_jax.errors.TileRejected`, and the pipeline replaces it by a random
other window; that happens at read time because the index never looks at pixels.

Scenes are skipped at index time, each with a logged reason, when their header cannot be read,
they lack a band of ``data.bands``, their pixel type differs from the first usable scene's (raw
mode), or they are smaller than the tile.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np

from cmid_jax.data import raster
from cmid_jax.data.bands import (
    ALL_BANDS,
    check_bands_setting,
    compact,
    compact_dtype,
    nodata_fraction,
    resolve_bands,
)
from cmid_jax.data.files import to_rgb_uint8
from cmid_jax.errors import ConfigError, DataError, ImageError, TileRejected

log = logging.getLogger(__name__)


def window_starts(length: int, tile: int) -> np.ndarray:
    """Start offsets of ``ceil(length / tile)`` windows of ``tile`` pixels spread evenly over
    ``length`` pixels (first at 0, last at ``length - tile``). Needs ``length >= tile``."""
    n = math.ceil(length / tile)
    return np.rint(np.linspace(0, length - tile, n)).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Scene:
    path: str
    bands: tuple[int, ...]  # 0-based band indices read from this scene
    nodata: float | None
    rows: tuple[int, ...]  # window tops
    cols: tuple[int, ...]  # window lefts

    @property
    def num_windows(self) -> int:
        return len(self.rows) * len(self.cols)


@dataclasses.dataclass(frozen=True)
class TileIndex:
    """The (scene, window) entries of a set of scenes, plus the scenes skipped and why."""

    tile: int
    scenes: tuple[Scene, ...]
    skipped: tuple[tuple[str, str], ...]  # (path, reason)
    dtype: np.dtype  # pixel type of the tiles as read (before any RGB conversion)

    def __post_init__(self):
        # Entry i belongs to the first scene whose cumulative window count exceeds i.
        object.__setattr__(self, 'ends', np.cumsum([s.num_windows for s in self.scenes]))

    @classmethod
    def build(
        cls, files: Sequence[str], tile: int, bands: Sequence[int | str] | str | None = None
    ) -> TileIndex:
        """Reads the header of every file. ``bands`` None: the first (up to) 3 bands, for
        8-bit RGB; ``ALL_BANDS``: every band, and every scene must have as many as the first
        usable one; otherwise :func:`~cmid_jax.data.bands.resolve_bands` per scene (names may
        sit at different positions in different files).

        Raises:
          ConfigError: ``tile`` is not positive; DataError: no scene is usable (every reason listed).
        """
        if tile < 1:
            raise ConfigError(f'data.tile_size={tile} must be positive to cut scenes into tiles')
        all_bands = isinstance(bands, str) and bands == ALL_BANDS
        bands = bands if all_bands else check_bands_setting(bands)
        scenes, skipped = [], []
        dtype = None
        for path in files:
            try:
                info = raster.read_info(path)
                if bands is None:
                    indices = tuple(range(min(3, info.count)))
                elif all_bands:
                    indices = tuple(range(info.count))
                    if scenes and info.count != len(scenes[0].bands):
                        raise ImageError(
                            path,
                            f'has {info.count} bands, the first usable scene '
                            f'{scenes[0].path!r} has {len(scenes[0].bands)}',
                        )
                else:
                    indices = resolve_bands(bands, info.band_names, path)
                scene_dtype = compact_dtype(info.dtype)
                if bands is not None and dtype is not None and scene_dtype != dtype:
                    raise ImageError(
                        path,
                        f'pixel type {info.dtype} differs from the {dtype} of the first '
                        f'usable scene {scenes[0].path!r}',
                    )
                if info.height < tile or info.width < tile:
                    raise ImageError(
                        path,
                        f'scene is {info.height}x{info.width} pixels, smaller than '
                        f'data.tile_size={tile}',
                    )
            except ImageError as e:
                log.warning('skipping scene: %s', e)
                skipped.append((path, e.reason))
                continue
            dtype = scene_dtype if dtype is None else dtype
            scenes.append(
                Scene(
                    path,
                    indices,
                    info.nodata,
                    tuple(int(v) for v in window_starts(info.height, tile)),
                    tuple(int(v) for v in window_starts(info.width, tile)),
                )
            )
        if not scenes:
            reasons = '\n  '.join(f'{p}: {r}' for p, r in skipped)
            raise DataError(
                f'no usable scene for data.tile_size={tile} among {len(files)} files:\n  {reasons}'
            )
        if skipped:
            log.warning('%d of %d scenes skipped (reasons above)', len(skipped), len(files))
        return cls(tile, tuple(scenes), tuple(skipped), dtype)

    @property
    def num_bands(self) -> int:
        return len(self.scenes[0].bands)

    def __len__(self) -> int:
        return int(self.ends[-1]) if self.scenes else 0

    def locate(self, index: int) -> tuple[Scene, raster.Window]:
        """Scene and window of entry ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f'tile index {index} out of range [0, {len(self)})')
        k = int(np.searchsorted(self.ends, index, side='right'))
        scene = self.scenes[k]
        local = index - (int(self.ends[k - 1]) if k else 0)
        r, c = divmod(local, len(scene.cols))
        return scene, raster.Window(scene.rows[r], scene.cols[c], self.tile, self.tile)


class TileSource:
    """The tiles of a :class:`TileIndex` as a pipeline source (see the module docstring).

    ``rgb8`` (``data.bands`` None): each tile goes through the 8-bit RGB rule of
    :func:`cmid_jax.data.files.to_rgb_uint8` (non-uint8 tiles stretched per tile); otherwise the
    raw values of the index's bands.
    """

    unit = 'tiles'

    def __init__(self, index: TileIndex, *, rgb8: bool, max_nodata: float = 1.0):
        if not 0.0 <= max_nodata <= 1.0:
            raise ConfigError(f'data.max_nodata={max_nodata} must be a fraction in [0, 1]')
        self.index = index
        self.rgb8 = rgb8
        self.max_nodata = float(max_nodata)
        self.dtype = np.dtype(np.uint8) if rgb8 else index.dtype
        self.num_bands = 3 if rgb8 else index.num_bands

    def __len__(self) -> int:
        return len(self.index)

    def describe(self, index: int) -> str:
        scene, w = self.index.locate(index)
        return f'{scene.path} window (top={w.top}, left={w.left}, {w.height}x{w.width})'

    def read_raw(self, index: int) -> tuple[np.ndarray, float | None]:
        """The window's raw selected bands (compact type) and the scene's nodata value."""
        scene, window = self.index.locate(index)
        tile = compact(raster.read_raster(scene.path, scene.bands, window), scene.path)
        return tile, scene.nodata

    def read(self, index: int) -> np.ndarray:
        tile, nodata = self.read_raw(index)
        fraction = nodata_fraction(tile, nodata)
        if fraction > self.max_nodata:
            raise TileRejected(self.describe(index), fraction, self.max_nodata)
        if self.rgb8:
            return to_rgb_uint8(tile, self.describe(index), nodata)
        if tile.dtype != self.dtype:  # the header promised another type
            raise ImageError(
                self.describe(index), f'pixel type {tile.dtype}, expected {self.dtype}'
            )
        return tile
