"""Choosing the data source from ``config.data`` and resolving the per-band settings.

Which source (``open_source``):

=========================================  =====================================================
``data.source='tfds:NAME[/CONFIG]:SPLIT'``  a prepared TFDS dataset (``data.path`` = its data_dir)
``data.path`` with a ``manifest.json``      ArrayRecord shards from ``python -m cmid_jax.tools.prepare``
``data.tile_size = N > 0``                  N x N windows of the scenes under ``data.path``
otherwise                                   every image file under ``data.path`` (the default;
                                            None = the bundled Landsat-8 demo tiles)
=========================================  =====================================================

``data.bands`` None is 8-bit RGB as always; a tuple selects raw bands (:mod:`cmid_jax.data.bands`).

What the config leaves to the data (the pixel type, statistics and value range) is filled in
from the opened source by :func:`cmid_jax.config_resolve.resolve`.

``source_stats`` opens the source and computes the statistics ``data.stats`` reads back
(:mod:`cmid_jax.data.stats`, which knows nothing of the sources).
"""

from __future__ import annotations

import logging
from typing import Any

from cmid_jax.data import records
from cmid_jax.data.bands import check_bands_setting
from cmid_jax.data.files import demo_data_path, list_images
from cmid_jax.data.pipeline import FileSource, Source
from cmid_jax.data.stats import compute_stats
from cmid_jax.data.tfds_source import TfdsSource
from cmid_jax.data.tiles import TileIndex, TileSource
from cmid_jax.errors import DataError

log = logging.getLogger(__name__)


def open_source(data) -> Source:
    """The source ``config.data`` describes (see the module docstring).

    The settings themselves were checked by `cmid_jax.config_resolve.resolve`.

    Raises:
      DataError: data that do not fit the settings, naming the key, the value and what was
        expected.
    """
    bands = check_bands_setting(data.bands)
    tile = int(data.tile_size or 0)  # Checked with the rest of the config (config_resolve).
    spec = data.get('source')
    if spec:
        return TfdsSource(spec, data_dir=data.path, bands=bands)
    path = data.path or demo_data_path()
    if records.is_prepared(path):
        if tile:
            manifest = records.read_manifest(path)
            raise DataError(
                f'data.path={path!r} holds ArrayRecord shards from cmid-prepare, '
                f'already cut (tile size {manifest["tile_size"]}); set '
                f'data.tile_size=0 to read them'
            )
        return records.RecordSource(path, bands)
    files = list_images(path)
    if tile:
        return TileSource(
            TileIndex.build(files, tile, bands), rgb8=bands is None, max_nodata=data.max_nodata
        )
    return FileSource(files, bands, max_nodata=data.max_nodata)


def describe_source(data, source: Source) -> str:
    """One line for the log: what is read, from where, how many elements."""
    where = data.get('source') or data.path or demo_data_path()
    mode = '8-bit RGB' if data.bands is None else f'bands {tuple(data.bands)}'
    return (
        f'{len(source)} {source.unit} ({mode}, {source.num_bands}x{source.dtype.name}) from {where}'
    )


def source_stats(config, samples: int) -> dict[str, Any]:
    """Statistics (:func:`cmid_jax.data.stats.compute_stats`) of the data `config.data` describes,
    with the settings that produced them."""
    data = config.data
    source = open_source(data)
    log.info('Reading %d of %s.', min(samples, len(source)), describe_source(data, source))
    stats = compute_stats(source, samples=samples, seed=config.seed)
    stats.update(
        bands=None if data.bands is None else list(data.bands),
        source=describe_source(data, source),
        tile_size=data.tile_size,
        max_nodata=data.max_nodata,
    )
    return stats
