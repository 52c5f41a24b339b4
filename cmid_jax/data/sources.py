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

What the config leaves to the data (``resolve_data_config``, run on the copy that ``config.json``
records): ``data.path``, ``data.dtype`` (the pixel type, which fixes the device scale),
``data.mean`` / ``data.std`` from ``data.stats`` when given, and ``data.value_range`` (from the
stats, else 0 to the type maximum). Band counts of mean/std are checked against the data.

``source_stats`` opens the source and computes the statistics ``data.stats`` reads back
(:mod:`cmid_jax.data.stats`, which knows nothing of the sources).
"""

from __future__ import annotations

import logging
from typing import Any

from cmid_jax.data import records
from cmid_jax.data.bands import check_bands_setting, num_bands, type_max
from cmid_jax.data.files import demo_data_path, list_images
from cmid_jax.data.pipeline import FileSource, Source
from cmid_jax.data.stats import compute_stats, load_stats
from cmid_jax.data.tfds_source import PREFIX as TFDS_PREFIX
from cmid_jax.data.tfds_source import TfdsSource
from cmid_jax.data.tiles import TileIndex, TileSource

log = logging.getLogger(__name__)


def open_source(data) -> Source:
    """The source ``config.data`` describes (see the module docstring).

    Raises:
      ValueError / FileNotFoundError: naming the config key, the value and what was expected.
    """
    bands = check_bands_setting(data.bands)
    tile = int(data.tile_size or 0)
    if tile < 0:
        raise ValueError(f'data.tile_size={tile} must be 0 (whole images) or a tile side in pixels')
    if 0 < tile < data.image_size:
        raise ValueError(
            f'data.tile_size={tile} is smaller than the crop data.image_size='
            f'{data.image_size}; use tiles of at least the crop size (or 0 for whole '
            f'images)'
        )
    spec = data.get('source')
    if spec:
        if not spec.startswith(TFDS_PREFIX):
            raise ValueError(
                f"data.source={spec!r}: expected 'tfds:NAME[/CONFIG]:SPLIT', or None "
                f'to read data.path'
            )
        if tile:
            raise ValueError(
                f'data.tile_size={tile} cuts scenes of a folder; it does not apply to '
                f'data.source={spec!r} (set it to 0)'
            )
        return TfdsSource(spec, data_dir=data.path, bands=bands)
    path = data.path or demo_data_path()
    if records.is_prepared(path):
        if tile:
            manifest = records.read_manifest(path)
            raise ValueError(
                f'data.path={path!r} holds ArrayRecord shards from cmid_jax.data.prepare, '
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


def resolve_data_config(data, source: Source) -> None:
    """Fills in ``data.path``, ``data.dtype``, ``data.mean`` / ``data.std`` (from ``data.stats``)
    and ``data.value_range`` for ``source``, and checks them. Mutates ``data``.

    Raises:
      ValueError: a setting that does not fit the data, naming the key, its value and what the
        data needs.
    """
    if not data.get('source'):
        data.path = data.path or demo_data_path()
    bands = num_bands(data)
    if source.num_bands != bands:  # sources follow data.bands; this guards new sources
        raise ValueError(
            f'the data has {source.num_bands} bands, data.bands={data.bands!r} implies {bands}'
        )
    dtype = source.dtype.name
    if data.dtype is not None and data.dtype != dtype:
        raise ValueError(f"data.dtype={data.dtype!r}, but the data's pixels are {dtype}")
    data.dtype = dtype
    if data.stats:
        stats = load_stats(data.stats)
        requested = None if data.bands is None else list(data.bands)
        if stats['bands'] != requested or stats['dtype'] != dtype:
            raise ValueError(
                f'data.stats={data.stats!r} was computed for bands {stats["bands"]} of '
                f'{stats["dtype"]} pixels, but this run reads bands {requested} of {dtype} pixels; '
                f'recompute it with python -m cmid_jax.tools.data_stats and the same data settings'
            )
        data.mean, data.std = tuple(stats['mean']), tuple(stats['std'])
        if data.value_range is None:
            data.value_range = tuple(stats['value_range'])
    for key in ('mean', 'std'):
        values = tuple(data[key])
        if len(values) != bands:
            raise ValueError(
                f'data.{key} has {len(values)} values for {bands} bands (data.bands='
                f'{data.bands!r}); compute per-band values with `python -m cmid_jax.tools.data_stats '
                f'--config=... --out=stats.json` and pass --config.data.stats=stats.json'
            )
    if any(not s > 0 for s in data.std):
        raise ValueError(f'data.std={tuple(data.std)!r} must be positive for every band')
    if data.value_range is None:
        data.value_range = (0.0, type_max(dtype))
    black, white = map(float, data.value_range)
    if not 0 <= black < white <= type_max(dtype):
        raise ValueError(
            f'data.value_range={tuple(data.value_range)!r} must be (black, white) '
            f'with 0 <= black < white <= {type_max(dtype):g} for {dtype} data'
        )
    data.value_range = (black, white)
    if not 0.0 <= data.max_nodata <= 1.0:
        raise ValueError(f'data.max_nodata={data.max_nodata} must be a fraction in [0, 1]')


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
