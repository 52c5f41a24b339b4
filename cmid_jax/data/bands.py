"""Bands, pixel types and the value scale shared by every data source.

Two modes, chosen by ``config.data.bands``:

* ``None`` (default): **8-bit RGB**, exactly as before: the first 3 bands (a 1- or 2-band image is
  grey), non-uint8 data stretched per image (or per tile) to uint8, see
  :mod:`cmid_jax.data.files`.
* a tuple of 0-based band indices and/or band names, e.g. ``(0, 1, 2, 3)`` or
  ``('red', 'green', 'blue')``: those bands in that order, with their **raw values** (uint8 or
  uint16). A name matches a band's description or, failing that, its colour interpretation
  (``red``, ``green``, ``blue``, ``alpha``, ``gray``), case-insensitively.

Pixels stay uint8 / uint16 on the host and on the host-to-device transfer. On the device they are
divided by their type's maximum (:func:`type_max`: 255 for uint8, exactly as before; 65535 for
uint16), then normalised per band with ``data.mean`` / ``data.std``, which are therefore in those
0-1 units (``python -m cmid_jax.tools.data_stats`` computes them).

A pixel is *nodata* when all of its bands equal the file's nodata value (0 when the file declares
none) or any of them is NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cmid_jax.errors import ConfigError, DataError, ImageError

# Pixel types that travel to the device; anything else is converted by ``compact`` or refused.
PIXEL_DTYPES = ('uint8', 'uint16')
ALL_BANDS = 'all'  # keep every band of the file (cmid-prepare's default; not a config value)


def type_max(dtype) -> float:
    """Full-scale value of a pixel type: 255 for uint8, 65535 for uint16. Floating-point images
    are taken to be on the 0-255 scale, as the 8-bit pipeline always did."""
    dtype = np.dtype(dtype)
    if dtype == np.uint16:
        return 65535.0
    if dtype == np.uint8 or not np.issubdtype(dtype, np.integer):  # floats, bfloat16
        return 255.0
    raise DataError(f'unsupported pixel type {dtype}; expected one of {", ".join(PIXEL_DTYPES)}')


def compact_dtype(dtype) -> np.dtype:
    """The pixel type an array of ``dtype`` is carried as: uint8 stays, everything else uint16."""
    return np.dtype(np.uint8) if np.dtype(dtype) == np.uint8 else np.dtype(np.uint16)


def compact(array: np.ndarray, where: str) -> np.ndarray:
    """uint8 / uint16 arrays unchanged; other integer or float arrays whose values are all whole
    numbers in [0, 65535] (e.g. int16 DNs, float32 holding 16-bit reflectance) become uint16.

    Raises:
      ImageError: naming ``where``, for values that uint16 cannot hold exactly.
    """
    if array.dtype in (np.uint8, np.uint16):
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    if array.dtype.kind not in 'iuf':
        raise ImageError(where, f'unsupported pixel type {array.dtype}')
    finite = np.isfinite(array) if array.dtype.kind == 'f' else True
    values = np.where(finite, array, 0)
    if (values.size and (values.min() < 0 or values.max() > 65535)) or (
        array.dtype.kind == 'f' and not np.array_equal(values, np.round(values))
    ):
        raise ImageError(
            where,
            f'{array.dtype} values outside the whole numbers 0..65535 cannot be carried as '
            f'uint16 (rescale them, e.g. reflectance x 10000, before training)',
        )
    return values.astype(np.uint16)


def valid_mask(array: np.ndarray, nodata: float | None = None) -> np.ndarray:
    """(H, W) bool: False where every band equals ``nodata`` (0 if None) or any band is NaN."""
    fill = 0 if nodata is None or np.isnan(nodata) else nodata
    valid = np.any(array != fill, axis=2)
    if array.dtype.kind == 'f':
        valid &= ~np.isnan(array).any(axis=2)
    return valid


def nodata_fraction(array: np.ndarray, nodata: float | None = None) -> float:
    return 1.0 - float(valid_mask(array, nodata).mean())


def resolve_bands(
    requested: Sequence[int | str], names: Sequence[str | None], where: str
) -> tuple[int, ...]:
    """0-based band indices for ``requested`` (indices and/or names) in a file whose bands are
    called ``names`` (``None`` for an unnamed band).

    Raises:
      ImageError: naming ``where``, the request and the bands the file has.
    """
    count = len(names)
    lowered = [n.lower() if n else None for n in names]
    out = []
    for band in requested:
        if isinstance(band, str):
            if band.lower() not in lowered:
                raise ImageError(
                    where,
                    f'data.bands={tuple(requested)!r} asks for band {band!r}, but the {count} '
                    f'bands are named {list(names)} (use 0-based indices instead)',
                )
            out.append(lowered.index(band.lower()))
        elif isinstance(band, (int, np.integer)) and not isinstance(band, bool):
            if not 0 <= band < count:
                raise ImageError(
                    where,
                    f'has {count} band{"s" if count != 1 else ""}; data.bands='
                    f'{tuple(requested)!r} needs 0-based band index {band}',
                )
            out.append(int(band))
        else:
            raise DataError(
                f'data.bands={tuple(requested)!r}: {band!r} is neither a 0-based index nor a name'
            )
    return tuple(out)


def check_bands_setting(bands) -> tuple | None:
    """Validates ``data.bands`` itself (not against a file); returns it as a tuple or None."""
    if bands is None:
        return None
    bands = tuple(bands)
    if not bands:
        raise ConfigError('data.bands=() selects no band; use None for 8-bit RGB or list bands')
    for band in bands:
        ok_index = isinstance(band, (int, np.integer)) and not isinstance(band, bool) and band >= 0
        if not (ok_index or (isinstance(band, str) and band)):
            raise ConfigError(
                f'data.bands={bands!r}: {band!r} is neither a 0-based index nor a band name'
            )
    return bands


def num_bands(data_config) -> int:
    """Input channels of the model for ``config.data``: 3 in RGB mode, else ``len(data.bands)``."""
    bands = data_config.get('bands')  # configs saved before bands existed are RGB
    return 3 if bands is None else len(bands)


def is_rgb(data_config) -> bool:
    """Whether the colour-only augmentations (saturation, hue, grey) apply: ``data.rgb``, or, when
    that is None, exactly 3 bands."""
    rgb = data_config.get('rgb')
    if rgb is None:
        return num_bands(data_config) == 3
    if rgb and num_bands(data_config) != 3:
        bands = data_config.get('bands')
        raise ConfigError(f'data.rgb=True needs 3 bands, but data.bands={bands!r}')
    return bool(rgb)


def select(array: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """(H, W, C) -> (H, W, len(indices)), contiguous."""
    return np.ascontiguousarray(array[:, :, list(indices)])
