"""grain input pipeline for CMID pretraining.

``build_dataset`` returns an infinite, batched ``grain.MapDataset``:

    range(len(source)) -> .seed(s) -> .shuffle() -> .repeat() -> .batch(global_batch)
    -> .map_with_index(DecodeProcessSlice)

The elements are those of a :class:`Source`: image files (:class:`FileSource`, the default),
(scene, window) tiles of GeoTIFF scenes (:class:`cmid_jax.data.tiles.TileSource`), records of
a prepared ArrayRecord set (:class:`cmid_jax.data.records.RecordSource`) or of a TFDS dataset
(:class:`cmid_jax.data.tfds_source.TfdsSource`); :func:`cmid_jax.data.sources.open_source`
picks one from the config. All of them get the same shuffling, batching, per-process slicing,
crops and resumable state. The host only decodes, crops and flips; crop B's photometric chain and
the block masks are drawn on the device, in the train step (:mod:`cmid_jax.augment`).

* Several processes: every host computes the same shuffled file order and global
  batches (the file list is sorted by :func:`cmid_jax.data.files.list_images`) and
  decodes only its own slice of each batch, so a run gives the same batches, and the
  same numbers, on one host or many.
* Shuffling: grain's ``ShuffleMapDataset`` folds the epoch number into its seed when
  it is read past its length, which is what ``.repeat()`` does, so every epoch is a
  new permutation of the files (checked in ``tests/test_data.py``).
* Randomness: every element gets its own ``np.random.Generator`` seeded by
  ``(seed, batch index, position in the global batch)``, so crops differ
  between epochs and the pipeline is deterministic and resumable bit-identically.
* Bad files: an undecodable element is replaced by one drawn at random from the whole
  dataset with the element's generator (up to ``MAX_DECODE_TRIES`` elements in all), since
  bad files cluster (a broken sub-folder, a bad or nodata region of a scene spanning many
  neighbouring windows) and the next files in sorted order are often bad too.
  ``bad_images`` (int32, one row per element) holds ``1 +`` the index of every unreadable
  element skipped for it, 0-padded, so the train loop learns *which* files are bad (it
  reports and counts each once) even when decoding runs in grain worker processes. A tile
  rejected for nodata (``TileRejected``), as is a whole image (``data.max_nodata``), is
  replaced the same way but is not bad.

``make_iterator`` turns it into a checkpointable ``grain.DatasetIterator`` (optionally
with ``mp_prefetch`` worker processes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Protocol

import grain
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
from cmid_jax.data.files import load_image
from cmid_jax.data.views import check_image_size, make_views
from cmid_jax.errors import ConfigError, DataError, ImageError, TileRejected

log = logging.getLogger(__name__)

# With random replacement an element fails only if all its tries hit bad files: 0.5**64 for
# data that is half bad; the train loop stops long before, on the share of bad files.
MAX_DECODE_TRIES = 64


class Source(Protocol):
    """Random-access elements of a dataset, each an (H, W, C) uint8 / uint16 array."""

    unit: str  # what an element is, for logs: 'images', 'tiles', 'records'
    dtype: np.dtype  # pixel type of every element
    num_bands: int  # C of every element

    def __len__(self) -> int: ...

    def read(self, index: int) -> np.ndarray:
        """Raises ImageError (skipped and counted) or TileRejected (skipped, not counted)."""

    def describe(self, index: int) -> str:
        """Where element ``index`` comes from, for messages."""


class FileSource:
    """Whole image files, one element each.

    ``bands`` None: 8-bit RGB through :func:`cmid_jax.data.files.load_image` (unchanged).
    Otherwise the selected bands with their raw values (:mod:`cmid_jax.data.bands`), or every
    band for ``ALL_BANDS`` (as many as the first usable file has). The pixel type is that of the
    first usable file (readable, with the bands); a file of another type, band count or without
    the bands is skipped like an unreadable one. Files are only opened when read (a folder of
    millions of tiles costs nothing up front).

    An image with more than ``max_nodata`` nodata pixels raises ``TileRejected``, the rule of
    :class:`cmid_jax.data.tiles.TileSource` (:func:`cmid_jax.data.bands.nodata_fraction`): in
    raw-band mode on the selected bands with the file's nodata value; in 8-bit RGB mode on the
    decoded image, where ``load_image`` writes nodata pixels as 0 in every band (pixels the
    2-98% stretch clips to black in all three bands count too: about 1% of a demo tile).
    """

    unit = 'images'

    def __init__(
        self,
        files: Sequence[str],
        bands: Sequence[int | str] | str | None = None,
        max_nodata: float = 1.0,
    ):
        self.files = list(files)
        if not self.files:
            raise DataError('no image files to build a dataset from')
        if not 0.0 <= max_nodata <= 1.0:
            raise ConfigError(f'data.max_nodata={max_nodata} must be a fraction in [0, 1]')
        self.max_nodata = float(max_nodata)
        self.bands = bands if bands == ALL_BANDS else check_bands_setting(bands)
        if self.bands is None:
            self.dtype, self.num_bands = np.dtype(np.uint8), 3
            return
        info = self._first_usable()
        self.dtype = compact_dtype(info.dtype)
        self.num_bands = info.count if self.bands == ALL_BANDS else len(self.bands)

    def _first_usable(self) -> raster.RasterInfo:
        """Header of the first file that reads and has the requested bands."""
        failures = []
        for path in self.files[:MAX_DECODE_TRIES]:
            try:
                info = raster.read_info(path)
                if self.bands != ALL_BANDS:
                    resolve_bands(self.bands, info.band_names, path)
                return info
            except ImageError as e:
                failures.append(str(e))
        raise DataError(
            f'none of the first {len(failures)} image files can be read with '
            f'data.bands={self.bands!r}:\n  ' + '\n  '.join(failures)
        )

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return self.files[index]

    def read(self, index: int) -> np.ndarray:
        path = self.files[index]
        if self.bands is None:
            image, nodata = load_image(path), None
        else:
            info = raster.read_info(path)
            image, nodata = self._read_bands(path, info), info.nodata
        if self.max_nodata < 1.0:  # 1.0 accepts everything: no need to count.
            fraction = nodata_fraction(image, nodata)
            if fraction > self.max_nodata:
                raise TileRejected(path, fraction, self.max_nodata)
        return image

    def _read_bands(self, path: str, info: raster.RasterInfo) -> np.ndarray:
        """The selected bands of ``path`` with their raw values (compact pixel type)."""
        if self.bands == ALL_BANDS:
            if info.count != self.num_bands:
                raise ImageError(
                    path, f'has {info.count} bands, the first usable file has {self.num_bands}'
                )
            indices = range(info.count)
        else:
            indices = resolve_bands(self.bands, info.band_names, path)
        image = compact(raster.read_raster(path, indices), path)
        if image.dtype != self.dtype:
            raise ImageError(
                path,
                f"pixel type {image.dtype} differs from the dataset's {self.dtype} "
                f'(set by the first usable file)',
            )
        return image


class DecodeProcessSlice(grain.transforms.MapWithIndex):
    """Decode this process's slice of one global batch of element indices and build the views.

    Element ``j`` of the slice sits at position ``pos = process_index * b + j`` of global
    batch ``k``; its augmentations come from ``np.random.default_rng([seed, k, pos])``, so
    a global batch is the same whatever the number of processes that share it.

    If decoding fails, elements drawn at random with the element's generator are tried, at
    most ``max_tries`` in all; ``bad_images`` holds ``1 +`` the indices of the unreadable
    elements skipped (0-padded to ``max_tries``). If all of them fail a ``RuntimeError``
    naming them is raised. Module-level and picklable, so it works with spawned grain
    worker processes.

    ``source`` is a :class:`Source` or a list of image paths (a :class:`FileSource` in 8-bit
    RGB mode).
    """

    def __init__(
        self,
        source: Source | Sequence[str],
        *,
        image_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        max_tries: int = MAX_DECODE_TRIES,
    ):
        self.source = as_source(source)
        self.image_size = check_image_size(image_size)
        self.seed = int(seed) % 2**32
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.max_tries = int(max_tries)

    def map_with_index(self, index: int, element: np.ndarray) -> dict[str, np.ndarray]:
        b = len(element) // self.process_count
        first = self.process_index * b
        views = [
            self.decode(int(element[pos]), np.random.default_rng([self.seed, int(index), pos]))
            for pos in range(first, first + b)
        ]
        return {key: np.stack([v[key] for v in views]) for key in views[0]}

    def decode(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        source = self.source
        bad = np.zeros(self.max_tries, np.int32)
        failures: list[str] = []
        rejected = 0
        for k in range(self.max_tries):
            i = index if k == 0 else int(rng.integers(len(source)))
            try:
                image = source.read(i)
            except TileRejected as e:
                log.debug('replacing %s', e)
                rejected += 1
                continue
            except Exception as e:  # ImageError or anything else a decoder throws
                # The train loop reports each bad file once, from its index in bad_images.
                log.debug('replacing unreadable %s: %s', source.describe(i), e)
                bad[len(failures)] = i + 1
                failures.append(f'{source.describe(i)} ({type(e).__name__}: {e})')
                continue
            out = make_views(image, rng, self.image_size)
            out['bad_images'] = bad
            return out
        distinct = list(dict.fromkeys(failures))
        more = f' and {len(distinct) - 3} more' if len(distinct) > 3 else ''
        raise DataError(
            f'no usable {source.unit} in {self.max_tries} random tries starting from '
            f'{source.describe(index)}: {len(failures)} unreadable, {rejected} rejected as '
            f'mostly nodata (data.max_nodata); unreadable: {"; ".join(distinct[:3])}{more}'
        )


def as_source(source: Source | Sequence[str]) -> Source:
    """A list of paths becomes an 8-bit RGB :class:`FileSource`; a source is returned as is."""
    if hasattr(source, 'read') and hasattr(source, 'describe'):
        return source
    return FileSource(source)


def index_dataset(num_files: int, *, seed: int) -> grain.MapDataset:
    """Infinite stream of file indices, a new permutation of ``range(num_files)`` every
    epoch: ``range -> seed -> shuffle -> repeat``."""
    return (
        grain.MapDataset.range(num_files)
        .seed(int(seed) % 2**32)
        .shuffle()
        .repeat()  # infinite; grain folds the epoch into the shuffle seed
    )


def build_dataset(
    files: Source | Sequence[str],
    *,
    image_size: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Infinite, shuffled (per epoch), augmented dataset of this process's batch slices.

    Every process shuffles the same global file order and cuts the same global batches;
    each decodes only its ``global_batch_size // process_count`` elements of each. The
    concatenated slices of all processes therefore equal the single-process batch
    exactly, and a run is the same computation on one host or many.

    ``files`` is a list of image paths (8-bit RGB, as before) or any :class:`Source`.
    Batches are dicts of numpy arrays: ``img_a``/``img_b`` (b, S, S, C) resized, flipped crops
    of the source's pixel type (uint8 RGB by default), ``loc_a``/``loc_b`` float32 (b, g, g, 2),
    ``bad_images`` int32 (b, MAX_DECODE_TRIES) (1 + indices of unreadable elements, 0-padded),
    with ``g = S // 32`` and ``b`` the local batch size. Crop B's
    photometric augmentation and the block masks are made on the device (:mod:`cmid_jax.augment`).
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f'bad process {process_index} of {process_count}')
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ConfigError(
            f'global_batch_size={global_batch_size} must be a positive multiple of the '
            f'{process_count} processes'
        )
    if not files:
        raise ValueError('no image files to build a dataset from')
    source = as_source(files)
    if len(source) < global_batch_size:
        log.warning(
            '%d %s, fewer than the global batch of %d: batches repeat them',
            len(source),
            source.unit,
            global_batch_size,
        )
    transform = DecodeProcessSlice(
        source,
        image_size=image_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    return (
        index_dataset(len(source), seed=seed)
        .batch(global_batch_size, drop_remainder=True)
        .map_with_index(transform)
    )


def make_iterator(
    dataset: grain.MapDataset,
    *,
    num_workers: int,
    read_threads: int | None = None,
    prefetch_batches: int | None = None,
) -> grain.DatasetIterator:
    """Checkpointable iterator over ``dataset`` (``get_state``/``set_state``, and
    ``grain.checkpoint.CheckpointSave``/``CheckpointRestore`` with orbax).

    ``num_workers > 0`` adds ``mp_prefetch`` with that many spawned worker processes,
    each handling whole batches. ``read_threads`` / ``prefetch_batches`` set the
    per-process thread pool and its buffer (in batches; grain's defaults of 16 / 500
    are meant for small records and would hold hundreds of image batches): by default
    ``min(4, cpu_count)`` threads without workers, 1 thread per worker otherwise, and a
    buffer of twice the thread count. Call ``close()`` on the iterator when done.
    """
    if read_threads is None:
        read_threads = 1 if num_workers > 0 else max(1, min(4, os.cpu_count() or 1))
    if prefetch_batches is None:
        prefetch_batches = 2 * read_threads
    ds = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
    )
    if num_workers > 0:
        # grain's worker processes read absl flags: call this from a program whose flags absl has
        # parsed (the tools do; cmid_jax.train marks them parsed for library callers).
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
        ds = ds.map(_out_of_shared_memory)
    return iter(ds)


def _out_of_shared_memory(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copies a batch out of the worker's shared memory, which is unlinked when its arrays die.

    JAX on CPU wraps host arrays without copying, and its arrays are freed by Python's cycle
    collector only, so the shared blocks of the last batch outlived the run: "leaked
    shared_memory objects" at exit. A private copy lets each block go at once; it costs one
    memcpy of the batch (1.6 MB for the demo, 77 MB for 256 pairs of 224-px RGB crops).
    """
    return {key: np.array(value) for key, value in batch.items()}
