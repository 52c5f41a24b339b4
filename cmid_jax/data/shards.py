"""Convert a folder of images or GeoTIFF scenes into ArrayRecord shards for fast training reads.

    python -m cmid_jax.tools.prepare --src=DIR --out=DIR [--tile=N] [--bands=0,1,2,3] \\
        [--max_nodata=0.25] [--records_per_shard=4096] [--workers=4]

Then train with ``--config.data.path=OUT`` (the folder is recognised by its ``manifest.json``);
its records are shuffled globally and read without opening or decoding any image file.

* ``--tile=0`` (default): one record per image file. ``--tile=N``: every scene is cut into the
  N x N window grid of :mod:`cmid_jax.data.tiles` (windowed reads), and windows with more than
  ``--max_nodata`` nodata pixels are dropped and counted.
* ``--bands``: comma-separated 0-based band indices or names to keep, in that order; default every
  band (all files must then have the same band count). Pixels are stored raw (uint8 / uint16; other
  types as uint16 when lossless), so the training config chooses between 8-bit RGB
  (``data.bands=None``) and raw bands (``data.bands`` indexing the *stored* bands) later.
* Unreadable files, files with another band count or pixel type, scenes smaller than the tile and
  unreadable windows are skipped; each is listed with its reason in the manifest and counted.

The manifest (``manifest.json``, written last, so an interrupted conversion is never mistaken for
a finished one) records the counts, bands and their names, dtype, tile size, shards and the skipped
elements; see :mod:`cmid_jax.data.records`.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from cmid_jax.data import raster, records
from cmid_jax.data.bands import ALL_BANDS, check_bands_setting, resolve_bands
from cmid_jax.data.files import list_images
from cmid_jax.data.pipeline import FileSource
from cmid_jax.data.tiles import TileIndex, TileSource
from cmid_jax.errors import ConfigError, DataError, ImageError, TileRejected

log = logging.getLogger(__name__)

_CHUNK = 256  # elements read ahead by the thread pool


def _read(source, index: int) -> tuple[str, Any]:
    """('ok', array) | ('rejected', None) | ('skipped', reason) for element ``index``."""
    try:
        return 'ok', source.read(index)
    except TileRejected:
        return 'rejected', None
    except ImageError as e:
        return 'skipped', e.reason
    except Exception as e:  # a decoder may throw anything; one bad element never stops the run
        return 'skipped', f'{type(e).__name__}: {e}'


def _band_names(source, index: int) -> tuple[list[str | None], float | None]:
    """Names of the stored bands and the nodata value, from the header of element ``index``."""
    if isinstance(source, TileSource):
        scene, _ = source.index.locate(index)
        info = raster.read_info(scene.path)
        return [info.band_names[b] for b in scene.bands], scene.nodata
    path = source.files[index]
    info = raster.read_info(path)
    indices = (
        range(info.count)
        if source.bands == ALL_BANDS
        else resolve_bands(source.bands, info.band_names, path)
    )
    return [info.band_names[b] for b in indices], info.nodata


def prepare(
    src: str,
    out: str,
    *,
    tile: int = 0,
    bands: Sequence[int | str] | None = None,
    max_nodata: float = 0.25,
    records_per_shard: int = 4096,
    workers: int = 4,
) -> dict[str, Any]:
    """Converts ``src`` into shards under ``out``; returns the manifest (also written there).

    Raises:
      DataError / ConfigError: ``src`` has no images, ``out`` is already prepared, the
        settings are invalid, or no element at all could be converted.
    """
    if tile < 0:
        raise ConfigError(f'--tile={tile} must be 0 (whole images) or a tile side in pixels')
    if records.is_prepared(out):
        raise DataError(
            f'{out!r} already holds a prepared set ({records.MANIFEST}); remove it '
            f'or choose another --out'
        )
    files = list_images(src)
    wanted = ALL_BANDS if bands is None else check_bands_setting(bands)
    skipped: list[dict[str, str]] = []
    if tile:
        index = TileIndex.build(files, tile, wanted)
        source = TileSource(index, rgb8=False, max_nodata=max_nodata)
        skipped += [{'element': path, 'reason': reason} for path, reason in index.skipped]
    else:
        source = FileSource(files, wanted)
    os.makedirs(out, exist_ok=True)
    start, last_log = time.perf_counter(), time.perf_counter()
    first, rejected, nbytes = None, 0, 0
    with (
        records.ShardWriter(out, records_per_shard) as writer,
        concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool,
    ):
        for chunk in range(0, len(source), _CHUNK):
            ids = range(chunk, min(chunk + _CHUNK, len(source)))
            for i, (kind, payload) in zip(ids, pool.map(lambda i: _read(source, i), ids)):
                if kind == 'ok':
                    writer.write(payload)
                    nbytes += payload.nbytes
                    first = i if first is None else first
                elif kind == 'rejected':
                    rejected += 1
                else:
                    log.warning('skipping %s: %s', source.describe(i), payload)
                    skipped.append({'element': source.describe(i), 'reason': payload})
            if time.perf_counter() - last_log > 10:
                last_log = time.perf_counter()
                log.info('%d of %d %s read', ids[-1] + 1, len(source), source.unit)
        shards = writer.shards
    seconds = time.perf_counter() - start
    count = sum(s['records'] for s in shards)
    if first is None:
        reasons = '\n  '.join(f'{s["element"]}: {s["reason"]}' for s in skipped[:20])
        raise DataError(
            f'nothing to write from {src!r}: {len(skipped)} skipped, {rejected} '
            f'rejected as mostly nodata (--max_nodata={max_nodata}):\n  {reasons}'
        )
    names, nodata = _band_names(source, first)
    manifest = {
        'format': records.FORMAT,
        'created': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
        'source': os.path.abspath(src),
        'records': count,
        'dtype': source.dtype.name,
        'bands': source.num_bands,
        'band_names': names,
        'selected_bands': None if bands is None else list(wanted),
        'nodata': nodata,
        'tile_size': tile,
        'max_nodata': max_nodata if tile else None,
        'files': len(files),
        'rejected_nodata': rejected,
        'skipped_count': len(skipped),
        'skipped': skipped,
        'shards': shards,
        'seconds': round(seconds, 3),
        'megabytes': round(nbytes / 1e6, 3),
    }
    tmp = os.path.join(out, records.MANIFEST + '.tmp')
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(manifest, f, indent=2)
        f.write('\n')
    os.replace(tmp, os.path.join(out, records.MANIFEST))
    return manifest
