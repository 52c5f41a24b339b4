"""grain input pipeline for CMID pretraining.

``build_dataset`` returns an infinite, batched ``grain.MapDataset``:

    range(num_files) -> .seed(s) -> .shuffle() -> .repeat() -> .batch(global_batch)
    -> .map_with_index(DecodeProcessSlice)

* Several processes: every host computes the same shuffled file order and global
  batches (the file list is sorted by :func:`cmid_jax.data.files.list_images`) and
  decodes only its own slice of each batch, so a run gives the same batches, and the
  same numbers, on one host or many.
* Shuffling: grain's ``ShuffleMapDataset`` folds the epoch number into its seed when
  it is read past its length, which is what ``.repeat()`` does, so every epoch is a
  new permutation of the files (checked in ``tests/test_data.py``).
* Randomness: every element gets its own ``np.random.Generator`` seeded by
  ``(seed, batch index, position in the global batch)``, so augmentations differ
  between epochs and the pipeline is deterministic and resumable bit-identically.
* Bad files: an undecodable file is replaced by the next file(s) of the list (up to
  ``MAX_DECODE_TRIES`` files in all); ``bad_images`` (int32) counts the files skipped
  for that element.

``make_iterator`` turns it into a checkpointable ``grain.DatasetIterator`` (optionally
with ``mp_prefetch`` worker processes).
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import grain
import numpy as np

from cmid_jax.data.files import load_image
from cmid_jax.data.views import check_image_size, make_views

log = logging.getLogger(__name__)

MAX_DECODE_TRIES = 16


class DecodeProcessSlice(grain.transforms.MapWithIndex):
    """Decode this process's slice of one global batch of file indices and build the views.

    Element ``j`` of the slice sits at position ``pos = process_index * b + j`` of global
    batch ``k``; its augmentations come from ``np.random.default_rng([seed, k, pos])``, so
    a global batch is the same whatever the number of processes that share it.

    If decoding fails, the following files (wrapping around) are tried, at most
    ``max_tries`` files in all; ``bad_images`` holds the number of files skipped. If all
    of them fail a ``RuntimeError`` naming them is raised. Module-level and picklable, so
    it works with spawned grain worker processes.
    """

    def __init__(
        self,
        files: Sequence[str],
        *,
        image_size: int,
        mask_ratio: float,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        max_tries: int = MAX_DECODE_TRIES,
    ):
        self.files = list(files)
        self.image_size = check_image_size(image_size)
        self.mask_ratio = float(mask_ratio)
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

    def decode(self, file_index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        n = len(self.files)
        failures: list[str] = []
        for k in range(min(self.max_tries, n)):
            path = self.files[(file_index + k) % n]
            try:
                image = load_image(path)
            except Exception as e:  # ImageError or anything else a decoder throws
                log.warning("skipping unreadable image %s: %s", path, e)
                failures.append(f"{path} ({type(e).__name__}: {e})")
                continue
            out = make_views(image, rng, self.image_size, self.mask_ratio)
            out["bad_images"] = np.int32(k)
            return out
        raise RuntimeError(
            f"{len(failures)} consecutive image files could not be decoded:\n  "
            + "\n  ".join(failures)
        )


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
    files: Sequence[str],
    *,
    image_size: int,
    mask_ratio: float,
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

    Batches are dicts of numpy arrays: ``img_a``/``img_b`` uint8 (b, S, S, 3),
    ``mask_a``/``mask_b`` bool (b, g, g), ``loc_a``/``loc_b`` float32 (b, g, g, 2),
    ``bad_images`` int32 (b,), with ``g = S // 32`` and ``b`` the local batch size.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process {process_index} of {process_count}")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of the "
            f"{process_count} processes"
        )
    if not files:
        raise ValueError("no image files to build a dataset from")
    if len(files) < global_batch_size:
        log.warning(
            "%d files, fewer than the global batch of %d: batches repeat files",
            len(files), global_batch_size,
        )
    transform = DecodeProcessSlice(
        files, image_size=image_size, mask_ratio=mask_ratio, seed=seed,
        process_index=process_index, process_count=process_count,
    )
    return (
        index_dataset(len(files), seed=seed)
        .batch(global_batch_size, drop_remainder=True)
        .map_with_index(transform)
    )


def _ensure_absl_flags_parsed() -> None:
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


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
        _ensure_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(ds)
