"""Square windows over images of any size, and predictions stitched back from them (numpy only).

Windows of side `size` start every `stride` pixels along each axis, the last one flush with the
far border, so they cover every pixel (an image smaller than a window is first extended to one
by mirroring its bottom and right edges; the extension is cropped away again). The windows of
all images stream through `predict` in fixed batches of `batch_size` (the last zero-padded);
each pixel's prediction is the mean of those of all windows that cover it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from cmid_jax.errors import DataError
from cmid_jax.evaluation.features import pad_batch


def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Start offsets along an axis of `length` (>= size) pixels: every `stride`, plus the last
    window flush with the end."""
    if length < size:
        raise DataError(f'an axis of {length} px is shorter than the {size}-px window')
    if not 0 < stride <= size:
        raise ValueError(f'window stride must be in [1, {size}], got {stride}')
    starts = list(range(0, length - size, stride))
    return starts + [length - size]


def num_windows(shape: tuple[int, ...], size: int, stride: int) -> int:
    """How many windows `windows` cuts from an image of `shape` (H, W, ...)."""
    h, w = (max(d, size) for d in shape[:2])
    return len(window_starts(h, size, stride)) * len(window_starts(w, size, stride))


def extend_to(image: np.ndarray, size: int) -> np.ndarray:
    """`image` mirrored past its bottom / right edges until both sides are at least `size`."""
    h, w = image.shape[:2]
    pad = ((0, max(size - h, 0)), (0, max(size - w, 0))) + ((0, 0),) * (image.ndim - 2)
    return np.pad(image, pad, mode='reflect') if any(p[1] for p in pad[:2]) else image


def windows(image: np.ndarray, size: int, stride: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(n, size, size, ...) windows of `extend_to(image, size)` and their (top, left) offsets."""
    image = extend_to(image, size)
    h, w = image.shape[:2]
    offsets = [
        (y, x) for y in window_starts(h, size, stride) for x in window_starts(w, size, stride)
    ]
    return np.stack([image[y : y + size, x : x + size] for y, x in offsets]), offsets


def tiled_predict(
    predict: Callable[[np.ndarray], np.ndarray],
    images: Iterable[np.ndarray],
    size: int,
    stride: int,
    batch_size: int,
) -> Iterator[np.ndarray]:
    """Yields, for each (H, W, bands) image in turn, the (H, W, C) float32 mean of
    `predict(windows)` over the windows covering each pixel. `predict` maps a (batch_size, size,
    size, bands) batch to (batch_size, size, size, C) per-pixel outputs."""
    pending: list[tuple[int, int, int, np.ndarray]] = []  # (image index, top, left, window)
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, np.ndarray] = {}
    left: dict[int, int] = {}  # Windows of each image not yet predicted.
    shapes: dict[int, tuple[int, int]] = {}
    next_out = 0

    def run_batch():
        chunk = pending[:batch_size]
        del pending[:batch_size]
        out = predict(pad_batch(np.stack([w for *_, w in chunk]), batch_size))
        for (i, y, x, _), o in zip(chunk, np.asarray(out, np.float32)):
            if i not in sums:
                extended = tuple(max(d, size) for d in shapes[i])
                sums[i] = np.zeros(extended + o.shape[2:], np.float32)
                counts[i] = np.zeros(extended, np.float32)
            sums[i][y : y + size, x : x + size] += o
            counts[i][y : y + size, x : x + size] += 1
            left[i] -= 1

    def finished():
        nonlocal next_out
        while next_out in left and left[next_out] == 0:
            i = next_out
            h, w = shapes.pop(i)
            total, count = sums.pop(i), counts.pop(i)
            del left[i]
            next_out += 1
            yield (total / count[..., None])[:h, :w]

    for i, image in enumerate(images):
        shapes[i] = image.shape[:2]
        batch, offsets = windows(image, size, stride)
        left[i] = len(offsets)
        pending.extend((i, y, x, w) for (y, x), w in zip(offsets, batch))
        while len(pending) >= batch_size:
            run_batch()
            yield from finished()
    while pending:
        run_batch()
        yield from finished()
