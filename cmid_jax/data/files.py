"""Image discovery and decoding for CMID pretraining.

``list_images`` finds every image file below a folder (labels / class folders are
ignored). ``load_image`` decodes one file to an ``(H, W, 3) uint8`` RGB array.

Decoding rules
--------------
* JPEG / PNG: decoded with PIL and converted to RGB (grey, palette and RGBA images
  included). ``Image.load()`` is called so that truncated files fail here and not
  later. 16-bit / 32-bit / float PNGs (PIL modes ``I;16``, ``I``, ``F``) follow the
  non-uint8 rule below instead of PIL's clipping ``convert("RGB")``.
* TIFF / GeoTIFF: decoded with tifffile (first image series); if tifffile cannot
  (e.g. LZW without the optional ``imagecodecs`` package) an 8-bit TIFF is decoded
  with PIL instead. The band axis may be last ``(H, W, bands)`` or first
  ``(bands, H, W)``; it is taken to be first when ``bands <= 16``, both other axes
  are larger, and the last axis is not itself a plausible band axis (``> 16``).
  The first 3 bands are used as RGB; a 1- or 2-band image is shown as grey (band 0
  replicated).
* Non-uint8 data (e.g. uint16 Landsat digital numbers, int16, float reflectance) are
  stretched **per band** to uint8: ``v8 = round(255 * clip((v - p2) / (p98 - p2), 0, 1))``
  where ``p2`` / ``p98`` are the 2nd / 98th percentiles of that band over the valid
  pixels. A pixel is *nodata* when **all** bands of the file are 0 (or any band is
  NaN); nodata pixels are excluded from the percentiles and are written as 0 in all
  three output bands. A constant band (``p98 == p2``) maps to 0; an image without
  any valid pixel decodes to all zeros.
* uint8 data are used unchanged (no stretch).

Any failure (missing file, not an image, truncated data, unsupported layout) raises
:class:`ImageError`, a ``ValueError`` whose message names the file.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from cmid_jax.data.bands import valid_mask
from cmid_jax.errors import DataError, ImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = ('.jpg', '.jpeg', '.png', '.tif', '.tiff')
_TIFF_EXTENSIONS = ('.tif', '.tiff')
# Largest band count accepted for a band-first (bands, H, W) array.
_MAX_BANDS_FIRST = 16


def demo_data_path() -> str:
    """Folder of the built-in demo tiles (Landsat-8 uint16 TIFFs, public domain; see
    ``cmid_jax/demo_data/ATTRIBUTION.md``)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'demo_data')


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(path: str | os.PathLike) -> list[str]:
    """Return the sorted paths of all images below ``path`` (any nesting depth).

    Extensions ``.jpg .jpeg .png .tif .tiff`` are matched case-insensitively; class
    folders / labels are ignored. Hidden files and folders (names starting with
    ``.``, e.g. macOS ``._x.jpg`` resource forks) are skipped. Symlinked folders are
    followed (each real folder once). ``path`` may also be a single image file.

    Raises:
      DataError: ``path`` does not exist or holds no image.
    """
    root = os.fspath(path)
    if not os.path.exists(root):
        raise DataError(f'image path {root!r} does not exist')
    if os.path.isfile(root):
        if _is_image_name(root):
            return [root]
        raise DataError(
            f'{root!r} is not an image file (looked for extensions '
            f'{", ".join(IMAGE_EXTENSIONS)}, case-insensitive)'
        )
    found: list[str] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # symlink loop / duplicate
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith('.')]
        found.extend(
            os.path.join(dirpath, f)
            for f in filenames
            if not f.startswith('.') and _is_image_name(f)
        )
    if not found:
        raise DataError(
            f'no image files found under {root!r} (looked recursively for extensions '
            f'{", ".join(IMAGE_EXTENSIONS)}, case-insensitive)'
        )
    return sorted(found)


def stretch_to_uint8(bands: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Per-band 2-98 percentile stretch of ``(H, W, C)`` data to uint8.

    ``valid`` is an ``(H, W)`` bool mask of the pixels used for the percentiles;
    invalid pixels are set to 0 in the output. See the module docstring.
    """
    h, w, c = bands.shape
    if valid is None:
        valid = np.ones((h, w), dtype=bool)
    out = np.zeros((h, w, c), dtype=np.uint8)
    if not valid.any():
        return out
    for b in range(c):
        band = bands[..., b]
        lo, hi = np.percentile(band[valid], [2.0, 98.0])
        if not hi > lo:  # constant band
            continue
        scaled = (band.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
        scaled = np.nan_to_num(np.clip(scaled, 0.0, 255.0), nan=0.0)
        out[..., b] = np.rint(scaled).astype(np.uint8)
    out[~valid] = 0
    return out


def to_rgb_uint8(arr: np.ndarray, path: str, nodata: float | None = None) -> np.ndarray:
    """(H, W) / (H, W, C) array of any dtype -> (H, W, 3) uint8 (rules above). ``nodata`` is
    the file's nodata value (None: 0)."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ImageError(path, f'unsupported image array shape {arr.shape}')
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if np.iscomplexobj(arr):
        raise ImageError(path, f'unsupported complex dtype {arr.dtype}')
    if arr.dtype == np.uint8:
        rgb = arr[:, :, :3]
    else:
        rgb = stretch_to_uint8(arr[:, :, :3], valid_mask(arr, nodata))
    if rgb.shape[2] < 3:  # 1 or 2 bands: grey from band 0
        rgb = np.repeat(rgb[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def _band_last(arr: np.ndarray) -> np.ndarray:
    """Squeeze leading singleton axes and move a band-first axis to the end."""
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3:
        b, h, w = arr.shape
        if b <= _MAX_BANDS_FIRST and h > b and w > b and w > _MAX_BANDS_FIRST:
            arr = np.moveaxis(arr, 0, -1)
    return arr


def _load_tiff(path: str) -> np.ndarray:
    import tifffile

    try:
        arr = tifffile.imread(path)
    except Exception as e:
        # tifffile needs the optional ``imagecodecs`` package for some compressions
        # (e.g. LZW, JPEG); PIL decodes those natively for 8-bit images.
        fallback = _load_tiff_8bit_pil(path)
        if fallback is None:
            raise
        log.debug('tifffile failed on %s (%s); decoded with PIL', path, e)
        return fallback
    arr = _band_last(np.asarray(arr))
    if arr.ndim not in (2, 3):
        raise ImageError(path, f'unsupported TIFF array shape {arr.shape}')
    return to_rgb_uint8(arr, path)


def _load_tiff_8bit_pil(path: str) -> np.ndarray | None:
    """PIL decode of an 8-bit-per-sample TIFF, or None if PIL cannot do it safely."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            bits = im.tag_v2.get(258, 8)  # BitsPerSample
            bits = tuple(bits) if isinstance(bits, (tuple, list)) else (bits,)
            modes = ('L', 'P', 'RGB', 'RGBA', 'RGBX', 'CMYK')
            if any(b != 8 for b in bits) or im.mode not in modes:
                return None
            im.load()
            return np.asarray(im.convert('RGB'), dtype=np.uint8).copy()
    except Exception:
        return None


def _load_pil(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # force a full decode: truncated files raise here
        if im.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F'):
            return to_rgb_uint8(np.asarray(im), path)
        return np.asarray(im.convert('RGB'), dtype=np.uint8).copy()


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decode one image file to an ``(H, W, 3) uint8`` RGB array.

    See the module docstring for the TIFF / non-uint8 / nodata rules.

    Raises:
      ImageError: the file is missing, unreadable, truncated or not an image.
    """
    p = os.fspath(path)
    try:
        if p.lower().endswith(_TIFF_EXTENSIONS):
            out = _load_tiff(p)
        else:
            out = _load_pil(p)
    except ImageError:
        raise
    except Exception as e:  # PIL / tifffile / OS errors of any kind
        raise ImageError(p, f'{type(e).__name__}: {e}') from e
    if out.ndim != 3 or out.shape[2] != 3 or out.shape[0] < 1 or out.shape[1] < 1:
        raise ImageError(p, f'decoded to unexpected shape {out.shape}')
    return out
