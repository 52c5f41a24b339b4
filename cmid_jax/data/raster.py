"""Raw (multi-band, native pixel type) reads of image files, whole or by window.

* GeoTIFF / TIFF: rasterio (GDAL), true windowed reads: only the blocks (tiles or strips) that
  overlap the window are read and decompressed, so a scene is never loaded whole. Any
  compression GDAL knows works (deflate, LZW, JPEG, ZSTD, ...). rasterio is an optional
  dependency: ``pip install 'cmid-jax[geo]'``.
* JPEG / PNG: PIL, decoded whole (these formats have no random access), then sliced.

Open rasterio datasets are cached per thread (grain reads with a thread pool; a GDAL dataset
handle must not be shared between threads), at most ``_MAX_OPEN`` per thread.

Every failure raises :class:`~cmid_jax.errors.ImageError` naming the file.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from cmid_jax.errors import ImageError

TIFF_EXTENSIONS = ('.tif', '.tiff')
_MAX_OPEN = 32
# PIL modes -> (band names, numpy dtype). Other modes are converted to RGB first.
_PIL_MODES = {
    'L': (('gray',), np.uint8),
    'LA': (('gray', 'alpha'), np.uint8),
    'RGB': (('red', 'green', 'blue'), np.uint8),
    'RGBA': (('red', 'green', 'blue', 'alpha'), np.uint8),
    'I;16': (('gray',), np.uint16),
    'I;16L': (('gray',), np.uint16),
    'I;16B': (('gray',), np.uint16),
    'I': (('gray',), np.int32),
    'F': (('gray',), np.float32),
}


class Window(NamedTuple):
    """Pixel window of a raster: rows ``top:top+height``, columns ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int


@dataclasses.dataclass(frozen=True)
class RasterInfo:
    """What the header of an image file says (no pixels read)."""

    path: str
    height: int
    width: int
    dtype: str  # native numpy type name of the bands
    nodata: float | None  # declared nodata value (GeoTIFF), else None
    band_names: tuple[str | None, ...]  # per band: description, else colour interpretation

    @property
    def count(self) -> int:
        return len(self.band_names)


def _is_tiff(path: str) -> bool:
    return path.lower().endswith(TIFF_EXTENSIONS)


# ------------------------------------------------------------------------------ rasterio
def _rasterio():
    try:
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(
            'reading TIFF bands or tiles (data.bands, data.tile_size, cmid-prepare) needs '
            "rasterio: pip install 'cmid-jax[geo]'"
        ) from e
    # Plain (non-geo) TIFFs are fine training data; GDAL's warning about them is noise.
    warnings.filterwarnings('ignore', category=NotGeoreferencedWarning)
    return rasterio


_local = threading.local()


def _dataset(path: str):
    """A cached, open rasterio dataset for ``path`` (per thread)."""
    cache = getattr(_local, 'datasets', None)
    if cache is None:
        cache = _local.datasets = collections.OrderedDict()
    ds = cache.get(path)
    if ds is not None:
        cache.move_to_end(path)
        return ds
    ds = _rasterio().open(path)
    cache[path] = ds
    if len(cache) > _MAX_OPEN:
        cache.popitem(last=False)[1].close()
    return ds


def _forget(path: str) -> None:
    cache = getattr(_local, 'datasets', None)
    if cache and path in cache:
        cache.pop(path).close()


def _tiff_info(path: str) -> RasterInfo:
    ds = _dataset(path)
    dtypes = set(ds.dtypes)
    if len(dtypes) != 1:
        raise ImageError(path, f'bands of different pixel types {sorted(dtypes)}')
    names = tuple(
        desc or (None if ci.name == 'undefined' else ci.name)
        for desc, ci in zip(ds.descriptions, ds.colorinterp)
    )
    return RasterInfo(path, ds.height, ds.width, ds.dtypes[0], ds.nodata, names)


def _tiff_read(path: str, bands: Sequence[int], window: Window | None) -> np.ndarray:
    ds = _dataset(path)
    rio_window = None
    if window is not None:
        from rasterio.windows import Window as RioWindow

        rio_window = RioWindow(window.left, window.top, window.width, window.height)
    data = ds.read([b + 1 for b in bands], window=rio_window)  # GDAL bands are 1-based
    return np.ascontiguousarray(np.moveaxis(data, 0, -1))


# ------------------------------------------------------------------------------------ PIL
def _pil_open(path: str):
    from PIL import Image

    im = Image.open(path)
    if im.mode not in _PIL_MODES:
        im.load()
        im = im.convert('RGBA' if 'A' in im.mode or 'transparency' in im.info else 'RGB')
    return im


def _pil_info(path: str) -> RasterInfo:
    with _pil_open(path) as im:
        names, dtype = _PIL_MODES[im.mode]
        return RasterInfo(path, im.height, im.width, np.dtype(dtype).name, None, names)


def _pil_read(path: str, bands: Sequence[int], window: Window | None) -> np.ndarray:
    with _pil_open(path) as im:
        im.load()  # full decode: truncated files fail here
        _, dtype = _PIL_MODES[im.mode]
        arr = np.asarray(im).astype(dtype, copy=False)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if window is not None:
        arr = arr[window.top : window.top + window.height, window.left : window.left + window.width]
    return np.ascontiguousarray(arr[:, :, list(bands)])


# -------------------------------------------------------------------------------- public
def read_info(path: str | os.PathLike) -> RasterInfo:
    """Header of one image file: size, pixel type, nodata value and band names.

    Raises:
      ImageError: the file is missing, unreadable or not an image.
    """
    p = os.fspath(path)
    try:
        return _tiff_info(p) if _is_tiff(p) else _pil_info(p)
    except (ImageError, ImportError):
        raise
    except Exception as e:  # rasterio / PIL / OS errors of any kind
        _forget(p)
        raise ImageError(p, f'{type(e).__name__}: {e}') from e


def read_raster(
    path: str | os.PathLike, bands: Sequence[int] | None = None, window: Window | None = None
) -> np.ndarray:
    """Bands ``bands`` (0-based; None = all) of ``window`` (None = the whole image) as an
    ``(H, W, len(bands))`` array of the file's own pixel type.

    Raises:
      ImageError: the file is unreadable, truncated, or the window / bands are out of range.
    """
    p = os.fspath(path)
    try:
        info = read_info(p)
        bands = range(info.count) if bands is None else bands
        bad = [b for b in bands if not 0 <= b < info.count]
        if bad:
            raise ImageError(p, f'has {info.count} bands; band indices {bad} do not exist')
        if window is not None and (
            window.top < 0
            or window.left < 0
            or window.height < 1
            or window.width < 1
            or window.top + window.height > info.height
            or window.left + window.width > info.width
        ):
            raise ImageError(
                p, f'window {tuple(window)} is outside the {info.height}x{info.width} image'
            )
        out = _tiff_read(p, bands, window) if _is_tiff(p) else _pil_read(p, bands, window)
    except (ImageError, ImportError):
        raise
    except Exception as e:
        _forget(p)
        raise ImageError(p, f'{type(e).__name__}: {e}') from e
    want = (window.height, window.width) if window is not None else (info.height, info.width)
    if out.shape[:2] != want:
        raise ImageError(p, f'decoded to {out.shape[:2]}, expected {want}')
    return out
