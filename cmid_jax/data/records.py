"""ArrayRecord shards written by ``python -m cmid_jax.tools.prepare`` and read as a pipeline source.

A prepared folder holds ``data-NNNNN.array_record`` shards and ``manifest.json``. Each record is
one image or tile as an ``.npy`` byte string (``numpy.lib.format``: dtype, shape and the raw
pixels, no pickle), so reading a record is a single random-access read plus a memory copy: no
image decoding, no per-file open. Shards are written with ``group_size:1`` so that any record is
read without decompressing its neighbours, and the pipeline shuffles the records globally.

When ``data.path`` is such a folder (it has a ``manifest.json`` with ``"format":
"cmid_jax.prepare/1"``), :func:`cmid_jax.data.sources.open_source` reads it with
:class:`RecordSource`. ``data.bands`` then indexes the bands *stored* in the records (names come
from the manifest's ``band_names``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from cmid_jax.data.bands import check_bands_setting, resolve_bands, select
from cmid_jax.data.files import to_rgb_uint8
from cmid_jax.data.tagged_json import read_tagged_json
from cmid_jax.errors import ConfigError, DataError, ImageError

MANIFEST = 'manifest.json'
FORMAT = 'cmid_jax.prepare/1'
_REQUIRED = ('records', 'dtype', 'bands', 'band_names', 'tile_size', 'shards')


def encode(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode(data: bytes, where: str) -> np.ndarray:
    try:
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise ImageError(where, f'corrupt record: {type(e).__name__}: {e}') from e


def is_prepared(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared folder, checked for the keys the reader needs."""
    file = os.path.join(os.fspath(path), MANIFEST)
    return read_tagged_json(file, FORMAT, _REQUIRED, f'the cmid-prepare manifest {file!r}')


class ShardWriter:
    """Writes records into shards of at most ``records_per_shard``; use as a context manager.
    ``shards`` lists ``{'file', 'records'}`` for the manifest."""

    def __init__(self, out_dir: str, records_per_shard: int):
        if records_per_shard < 1:
            raise ConfigError(f'records_per_shard={records_per_shard} must be positive')
        self.out_dir = out_dir
        self.records_per_shard = int(records_per_shard)
        self.shards: list[dict[str, Any]] = []
        self._writer = None

    def write(self, array: np.ndarray) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None or self.shards[-1]['records'] == self.records_per_shard:
            self._close_shard()
            name = f'data-{len(self.shards):05d}.array_record'
            # group_size:1: every record is its own chunk, so a random read touches one record.
            self._writer = ArrayRecordWriter(os.path.join(self.out_dir, name), 'group_size:1')
            self.shards.append({'file': name, 'records': 0})
        self._writer.write(encode(array))
        self.shards[-1]['records'] += 1

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._close_shard()


class RecordSource:
    """The records of a prepared folder (global random access over all shards)."""

    unit = 'records'

    def __init__(self, path: str | os.PathLike, bands: Sequence[int | str] | None = None):
        self.path = os.fspath(path)
        self.manifest = read_manifest(self.path)
        self.files = [os.path.join(self.path, s['file']) for s in self.manifest['shards']]
        absent = [f for f in self.files if not os.path.isfile(f)]
        if absent:
            raise DataError(
                f'the manifest in {self.path!r} lists shards that do not exist: {absent}'
            )
        self._len = int(self.manifest['records'])
        if self._len < 1:
            raise DataError(f'{self.path!r} holds no records (see skipped in its {MANIFEST})')
        self.bands = check_bands_setting(bands)
        if self.bands is None:
            self.indices = None
            self.dtype, self.num_bands = np.dtype(np.uint8), 3
        else:
            self.indices = resolve_bands(
                self.bands, self.manifest['band_names'], os.path.join(self.path, MANIFEST)
            )
            self.dtype, self.num_bands = np.dtype(self.manifest['dtype']), len(self.indices)
        self._records = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state['_records'] = None  # reopened lazily in each worker process
        return state

    def _source(self):
        if self._records is None:
            import grain

            self._records = grain.sources.ArrayRecordDataSource(self.files)
            if len(self._records) != self._len:
                raise DataError(
                    f'{self.path!r}: the shards hold {len(self._records)} records, '
                    f'the manifest says {self._len}'
                )
        return self._records

    def __len__(self) -> int:
        return self._len

    def describe(self, index: int) -> str:
        return f'{self.path} record {index}'

    def read_raw(self, index: int) -> np.ndarray:
        """Record ``index`` as stored (all stored bands)."""
        where = self.describe(index)
        try:
            data = self._source()[index]
        except Exception as e:
            raise ImageError(where, f'{type(e).__name__}: {e}') from e
        array = decode(data, where)
        if array.ndim != 3 or array.dtype != np.dtype(self.manifest['dtype']):
            raise ImageError(
                where,
                f'record is {array.shape} {array.dtype}, the manifest says '
                f'(H, W, {self.manifest["bands"]}) {self.manifest["dtype"]}',
            )
        return array

    def read(self, index: int) -> np.ndarray:
        array = self.read_raw(index)
        if self.indices is None:
            return to_rgb_uint8(array, self.describe(index), self.manifest.get('nodata'))
        return select(array, self.indices)
