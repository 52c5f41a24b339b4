"""The host half of the two CMID views of one image: decode-side geometry (pure numpy + PIL).

Semantics follow the official ``Pretrain/Dataset/transform.py`` (albumentations 1.2.1),
re-implemented here without OpenCV / albumentations:

* Pre-step: if the image width is not ``S`` the *whole* image is resized to ``S x S``
  with PIL bicubic (as the official ``ParallelTransform``).
* Crops A (``img``) and B (``view``): each an independent RandomResizedCrop(S, scale=(0.3, 1),
  ratio=(3/4, 4/3)) with the torchvision / albumentations sampler (10 attempts, then a
  centre-crop fallback), bilinear resize with OpenCV ``INTER_LINEAR`` semantics (half-pixel
  centres, border clamp, no antialiasing), horizontal flip p=0.5.
* Location grids: cell centres (y, x) of each crop in pixel coordinates of the
  (pre-resized) source image, columns mirrored for a flipped crop (see
  :func:`location_grid`; this fixes the official bug Q1).

Crop B's photometric chain and the block masks are drawn per pixel and per block, so they run on
the device inside the train step (:mod:`cmid_jax.augment`); normalisation happens there too.
Any band count, uint8 or uint16 (see :mod:`cmid_jax.data.bands`); the pre-step resize of
non-RGB or uint16 images is PIL bicubic per band (``L`` / ``F`` mode).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image

from cmid_jax.data.bands import type_max
from cmid_jax.errors import ConfigError

MASK_PATCH_SIZE = 32
CROP_SCALE = (0.3, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
P_FLIP = 0.5


class Crop(NamedTuple):
    """A crop box in pixels of the source image plus the flip flag."""

    top: int
    left: int
    height: int
    width: int
    flipped: bool


# --------------------------------------------------------------------------- geometry
def check_image_size(image_size: int) -> int:
    s = int(image_size)
    if s <= 0 or s % MASK_PATCH_SIZE != 0:
        raise ConfigError(
            f'image_size must be a positive multiple of {MASK_PATCH_SIZE}, got {image_size}'
        )
    return s


def _round_to(x: np.ndarray, dtype) -> np.ndarray:
    """Round + clip float values to the grid of the pixel type ``dtype``."""
    return np.clip(np.rint(x), 0, type_max(dtype)).astype(dtype)


def bicubic_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL bicubic resize of an (H, W, C) uint8 / uint16 image to (height, width): 8-bit RGB as
    one PIL image, other images band by band (uint8 in PIL mode ``L``, uint16 in ``F``, then
    rounded and clipped)."""
    if image.dtype == np.uint8 and image.shape[2] == 3:
        return np.asarray(
            Image.fromarray(image).resize((width, height), resample=Image.BICUBIC), dtype=np.uint8
        )
    out = np.empty((height, width, image.shape[2]), image.dtype)
    for b in range(image.shape[2]):
        band = image[:, :, b] if image.dtype == np.uint8 else image[:, :, b].astype(np.float32)
        resized = Image.fromarray(band).resize((width, height), resample=Image.BICUBIC)
        out[:, :, b] = _round_to(np.asarray(resized), image.dtype)
    return out


def pre_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Official pre-step: resize the whole image to size x size (:func:`bicubic_resize`) if its
    width differs from ``size``; otherwise return it unchanged."""
    return image if image.shape[1] == size else bicubic_resize(image, size, size)


def sample_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """RandomResizedCrop box ``(top, left, h, w)``: torchvision/albumentations sampler.

    Up to 10 attempts: area ~ U(scale) * H*W, log aspect ~ U(log ratio),
    w = round(sqrt(area*aspect)), h = round(sqrt(area/aspect)); accepted when it fits,
    then the offset is uniform over all integer positions. Otherwise a centre crop
    whose aspect is clamped to ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = float(rng.uniform(scale[0], scale[1])) * area
        aspect = math.exp(float(rng.uniform(log_ratio[0], log_ratio[1])))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _linear_taps(length: int, out: int):
    """Source indices/weights of OpenCV INTER_LINEAR along one axis of ``length``
    pixels resized to ``out`` (half-pixel centres, clamped at the borders)."""
    src = (np.arange(out, dtype=np.float64) + 0.5) * (length / out) - 0.5
    src = np.clip(src, 0.0, length - 1)
    i0 = np.floor(src).astype(np.int64)
    frac = (src - i0).astype(np.float32)
    i1 = np.minimum(i0 + 1, length - 1)
    return i0, i1, frac


def resized_crop(image: np.ndarray, top: int, left: int, h: int, w: int, size: int) -> np.ndarray:
    """Crop ``image[top:top+h, left:left+w]`` and resize it to ``size x size`` with
    bilinear interpolation (OpenCV INTER_LINEAR semantics, no antialiasing; the crop
    borders are clamped, pixels outside the crop are never read). Returns the image's
    own pixel type."""
    crop = image[top : top + h, left : left + w]
    if h == size and w == size:
        return np.ascontiguousarray(crop)
    y0, y1, fy = _linear_taps(h, size)
    x0, x1, fx = _linear_taps(w, size)
    crop = crop.astype(np.float32)
    fy = fy[:, None, None]
    rows = crop[y0] * (1.0 - fy) + crop[y1] * fy  # separable: rows, then columns
    fx = fx[None, :, None]
    out = rows[:, x0] * (1.0 - fx) + rows[:, x1] * fx
    return _round_to(out, image.dtype)


def location_grid(
    top: float, left: float, h: float, w: float, flipped: bool, grid: int
) -> np.ndarray:
    """Cell centres of a crop on a ``grid x grid`` lattice, shape (grid, grid, 2).

    ``[r, c] = (y, x)`` in pixel coordinates of the (pre-resized) source image:
    ``y = top + (r + 0.5) * h / grid``, ``x = left + (c + 0.5) * w / grid``. For a
    horizontally flipped crop the columns are mirrored (column ``c`` of the output
    shows source column ``grid - 1 - c``), so its x becomes that of ``grid - 1 - c``.

    NOTE: this deliberately fixes the official bug Q1: the official
    ``_location_to_NxN_grid`` adds the albumentations offset *fraction*
    ``i / (H - h)`` instead of the pixel offset ``i``, so there the matching ignores
    where the crops are. Here the true pixel offsets are used.
    """
    k = np.arange(grid, dtype=np.float64) + 0.5
    ys = top + k * (h / grid)
    xs = left + k * (w / grid)
    if flipped:
        xs = xs[::-1]
    out = np.empty((grid, grid, 2), dtype=np.float32)
    out[:, :, 0] = ys[:, None]
    out[:, :, 1] = xs[None, :]
    return out


# ------------------------------------------------------------------------------ views
def sample_crop(rng: np.random.Generator, height: int, width: int) -> Crop:
    top, left, h, w = sample_crop_box(rng, height, width)
    flipped = bool(rng.random() < P_FLIP)
    return Crop(top, left, h, w, flipped)


def apply_crop(image: np.ndarray, crop: Crop, size: int) -> np.ndarray:
    out = resized_crop(image, crop.top, crop.left, crop.height, crop.width, size)
    if crop.flipped:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def make_views(
    image: np.ndarray, rng: np.random.Generator, image_size: int = 224
) -> dict[str, np.ndarray]:
    """The host part of both CMID views of one (H, W, C) uint8 or uint16 image (a 2-D image is
    grey RGB).

    Returns ``img_a``/``img_b`` (S, S, C) of the image's type, resized crops, possibly flipped,
    and ``loc_a``/``loc_b`` float32 (g, g, 2) with ``g = S // 32``. Draw order from ``rng``:
    crop A (box, flip), crop B (box, flip).
    """
    size = check_image_size(image_size)
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] < 1 or image.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f'make_views expects an (H, W, C) uint8 or uint16 image, got {image.shape} '
            f'{image.dtype}'
        )
    image = pre_resize(image, size)
    height, width = image.shape[:2]
    grid = size // MASK_PATCH_SIZE
    crop_a = sample_crop(rng, height, width)
    crop_b = sample_crop(rng, height, width)
    return {
        'img_a': apply_crop(image, crop_a, size),
        'img_b': apply_crop(image, crop_b, size),
        'loc_a': location_grid(*crop_a, grid=grid),
        'loc_b': location_grid(*crop_b, grid=grid),
    }
