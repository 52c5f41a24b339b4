"""grain input pipeline for CMID pretraining.

``build_dataset`` returns an infinite, batched ``grain.MapDataset``:

    range(len(shard)) -> .seed(s) -> .shuffle() -> .repeat() -> DecodeAndMakeViews
    -> .batch(local_batch_size, drop_remainder=True)

* Sharding: each process keeps only ``files[shard_index::shard_count]`` (the file list
  is sorted by :func:`cmid_jax.data.files.list_images`, so the shards are disjoint and
  the same on every host) and never touches the other files.
* Shuffling: grain's ``ShuffleMapDataset`` folds the epoch number into its seed when
  it is read past its length, which is what ``.repeat()`` does, so every epoch is a
  new permutation of the shard (checked in ``tests/test_data.py``).
* Randomness: ``random_map`` gives every global element index its own
  ``np.random.Generator`` derived from the pipeline seed, so augmentations differ
  between epochs and the pipeline is deterministic and resumable bit-identically.
  The pipeline seed mixes ``seed`` with the shard index, so hosts do not draw the
  same crops for their k-th elements.
* Bad files: an undecodable file is replaced by the next file(s) of the shard (up to
  ``MAX_DECODE_TRIES`` files in all); ``bad_images`` (int32) counts the files skipped
  for that element.

``make_iterator`` turns it into a checkpointable ``grain.DatasetIterator`` (optionally
with ``mp_prefetch`` worker processes).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import grain
import numpy as np

from cmid_jax.data.files import load_image
from cmid_jax.data.views import check_image_size, make_views

log = logging.getLogger(__name__)

MAX_DECODE_TRIES = 16


class DecodeAndMakeViews(grain.transforms.RandomMap):
    """Decode the file at a shard index and build both CMID views.

    Elements are indices into ``files``. If decoding fails, the following files of
    the shard are tried in order (wrapping around), at most ``max_tries`` files in
    all; the output's ``bad_images`` field holds the number of files skipped. If all
    of them fail a ``RuntimeError`` naming them is raised.
    Module-level and picklable, so it works with spawned grain worker processes.
    """

    def __init__(
        self,
        files: Sequence[str],
        image_size: int,
        mask_ratio: float,
        max_tries: int = MAX_DECODE_TRIES,
    ):
        self.files = list(files)
        self.image_size = check_image_size(image_size)
        self.mask_ratio = float(mask_ratio)
        self.max_tries = int(max_tries)

    def random_map(self, element: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        n = len(self.files)
        index = int(element)
        failures: list[str] = []
        for k in range(min(self.max_tries, n)):
            path = self.files[(index + k) % n]
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


def _pipeline_seed(seed: int, shard_index: int, shard_count: int) -> int:
    if shard_count == 1:
        return int(seed) % 2**32
    ss = np.random.SeedSequence([int(seed) % 2**32, int(shard_index), int(shard_count)])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def shard_files(files: Sequence[str], shard_index: int = 0, shard_count: int = 1) -> list[str]:
    """This process's files: ``files[shard_index::shard_count]``."""
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"bad shard {shard_index} of {shard_count}")
    shard = list(files)[shard_index::shard_count]
    if not shard:
        raise ValueError(
            f"shard {shard_index} of {shard_count} is empty ({len(files)} files in all)"
        )
    return shard


def index_dataset(
    num_files: int, *, seed: int, shard_index: int = 0, shard_count: int = 1
) -> grain.MapDataset:
    """Infinite stream of indices into a shard's file list, a new permutation of
    ``range(num_files)`` every epoch: ``range -> seed -> shuffle -> repeat``. The
    returned dataset carries the pipeline seed for downstream random transforms."""
    return (
        grain.MapDataset.range(num_files)
        .seed(_pipeline_seed(seed, shard_index, shard_count))
        .shuffle()
        .repeat()  # infinite; grain folds the epoch into the shuffle/random_map seeds
    )


def build_dataset(
    files: Sequence[str],
    *,
    image_size: int,
    mask_ratio: float,
    local_batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.MapDataset:
    """Infinite, shuffled (per epoch), augmented and batched dataset of this shard.

    Batches are dicts of numpy arrays: ``img_a``/``img_b`` uint8 (b, S, S, 3),
    ``mask_a``/``mask_b`` bool (b, g, g), ``loc_a``/``loc_b`` float32 (b, g, g, 2),
    ``bad_images`` int32 (b,), with ``g = S // 32``.
    """
    if local_batch_size < 1:
        raise ValueError(f"local_batch_size must be >= 1, got {local_batch_size}")
    shard = shard_files(files, shard_index, shard_count)
    if len(shard) < local_batch_size:
        log.warning(
            "shard %d holds %d files, fewer than local_batch_size=%d: batches repeat files",
            shard_index, len(shard), local_batch_size,
        )
    transform = DecodeAndMakeViews(shard, image_size, mask_ratio)
    return (
        index_dataset(len(shard), seed=seed, shard_index=shard_index, shard_count=shard_count)
        .random_map(transform)
        .batch(local_batch_size, drop_remainder=True)
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
