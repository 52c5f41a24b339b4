"""The two CMID views of one image (pure numpy + PIL, one ``np.random.Generator``).

Semantics follow the official ``Pretrain/Dataset/transform.py`` (albumentations 1.2.1),
re-implemented here without OpenCV / albumentations:

* Pre-step: if the image width is not ``S`` the *whole* image is resized to ``S x S``
  with PIL bicubic (as the official ``ParallelTransform``).
* Crop A (``img``): RandomResizedCrop(S, scale=(0.3, 1), ratio=(3/4, 4/3)) with the
  torchvision / albumentations sampler (10 attempts, then a centre-crop fallback),
  bilinear resize with OpenCV ``INTER_LINEAR`` semantics (half-pixel centres, border
  clamp, no antialiasing), horizontal flip p=0.5. Geometric only.
* Crop B (``view``): an independent geometric draw as for A, then (in this order)
  ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8 with the four ops in random order,
  GaussianBlur (kernel 3..7 drawn as albumentations does, sigma U[0.1, 2]) p=1,
  GaussNoise (variance U[10, 50] on the 0-255 scale, per pixel and channel) p=0.6,
  Solarize(threshold 128) p=0.2, ToGray p=0.2.
  Every op works in float32 and rounds + clips back to the uint8 grid after itself, as
  the uint8 albumentations ops do (differences of +-1 grey level to OpenCV's fixed-point
  arithmetic are expected; ColorJitter's hue is shifted in float HSV instead of
  OpenCV's 180-level uint8 hue).
* Block masks: ``ceil(g*g*ratio)`` of the ``g x g`` 32-px blocks, ``g = S // 32``,
  chosen uniformly without replacement, independently for A and B (30 of 49 at 224).
* Location grids: cell centres (y, x) of each crop in pixel coordinates of the
  (pre-resized) source image, columns mirrored for a flipped crop (see
  :func:`location_grid`; this fixes the official bug Q1).

Any band count, uint8 or uint16 (see :mod:`cmid_jax.data.bands`). The numbers above are those of
8-bit RGB; for other data the ops are defined by :class:`Levels` (the data's black and white
values, default ``0`` and the type maximum, so 8-bit data are unchanged):

* brightness and contrast act on all bands jointly (contrast blends towards the mean of the luma
  for RGB, of all bands otherwise); saturation, hue and ToGray only run on RGB (``rgb=True``),
  but their random draws are always made (so both crops are the same for any band count);
* GaussNoise's standard deviation is scaled by ``(white - black) / 255``;
* Solarize inverts ``x -> black + white - x`` above ``black + (white - black) * 128 / 255``;
* every op rounds to whole numbers and clips to ``[0, type maximum]``;
* the pre-step resize of non-RGB or uint16 images is PIL bicubic per band (``L`` / ``F`` mode).

No normalisation is done here (it happens on device).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image

from cmid_jax.data.bands import type_max

MASK_PATCH_SIZE = 32
CROP_SCALE = (0.3, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# ColorJitter(brightness=.4, contrast=.4, saturation=.2, hue=.1) -> factor ranges.
BRIGHTNESS = (0.6, 1.4)
CONTRAST = (0.6, 1.4)
SATURATION = (0.8, 1.2)
HUE = (-0.1, 0.1)
P_COLOR_JITTER = 0.8
BLUR_KERNEL = (3, 7)
BLUR_SIGMA = (0.1, 2.0)
P_NOISE = 0.6
NOISE_VAR = (10.0, 50.0)
P_SOLARIZE = 0.2
SOLARIZE_THRESHOLD = 128
P_GRAY = 0.2
P_FLIP = 0.5
# ITU-R 601 luma, as OpenCV COLOR_RGB2GRAY.
_GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class Levels(NamedTuple):
    """Value levels the photometric ops work with, in the data's raw units."""

    black: float = 0.0
    white: float = 255.0  # noise and solarize scale with white - black
    ceiling: float = 255.0  # largest value of the pixel type; results are clipped to [0, ceiling]


EIGHT_BIT = Levels()


def levels_for(dtype, value_range: tuple[float, float] | None = None) -> Levels:
    """Levels of ``dtype`` data whose black and white are ``value_range`` (None: 0 and the type
    maximum)."""
    ceiling = type_max(dtype)
    black, white = (0.0, ceiling) if value_range is None else map(float, value_range)
    if not 0 <= black < white:
        raise ValueError(
            f"data.value_range={value_range!r} must be (black, white), 0 <= black < white")
    return Levels(black, white, ceiling)


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
        raise ValueError(
            f"image_size must be a positive multiple of {MASK_PATCH_SIZE}, got {image_size}"
        )
    return s


def pre_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Official pre-step: resize the whole image to size x size (PIL bicubic) if its
    width differs from ``size``; otherwise return it unchanged. 8-bit RGB is resized as
    one PIL image (as before); other images band by band (uint8 in PIL mode ``L``, uint16
    in ``F``, then rounded and clipped)."""
    if image.shape[1] == size:
        return image
    if image.dtype == np.uint8 and image.shape[2] == 3:
        return np.asarray(
            Image.fromarray(image).resize((size, size), resample=Image.BICUBIC), dtype=np.uint8
        )
    out = np.empty((size, size, image.shape[2]), image.dtype)
    for b in range(image.shape[2]):
        band = image[:, :, b] if image.dtype == np.uint8 else image[:, :, b].astype(np.float32)
        resized = np.asarray(Image.fromarray(band).resize((size, size), resample=Image.BICUBIC))
        out[:, :, b] = _round_to(resized, image.dtype)
    return out


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


def resized_crop(
    image: np.ndarray, top: int, left: int, h: int, w: int, size: int
) -> np.ndarray:
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


def block_mask(rng: np.random.Generator, grid: int, ratio: float = 0.6) -> np.ndarray:
    """Random block mask, bool (grid, grid): exactly ``ceil(grid*grid*ratio)`` True
    cells chosen uniformly without replacement (True = masked)."""
    n = grid * grid
    count = min(n, max(0, math.ceil(round(n * ratio, 9))))
    flat = np.zeros(n, dtype=bool)
    flat[rng.permutation(n)[:count]] = True
    return flat.reshape(grid, grid)


# ----------------------------------------------------------------------- photometric
def _round_to(x: np.ndarray, dtype) -> np.ndarray:
    """Round + clip float values to the grid of the pixel type ``dtype``."""
    return np.clip(np.rint(x), 0, type_max(dtype)).astype(dtype)


def _q(x: np.ndarray, ceiling: float = 255.0) -> np.ndarray:
    """Round + clip to the pixel grid [0, ceiling], staying float32."""
    return np.clip(np.rint(x), 0.0, ceiling).astype(np.float32, copy=False)


def _gray(x: np.ndarray) -> np.ndarray:
    return x @ _GRAY_WEIGHTS


def adjust_brightness(x: np.ndarray, factor: float, levels: Levels = EIGHT_BIT) -> np.ndarray:
    return _q(x * np.float32(factor), levels.ceiling)


def adjust_contrast(
    x: np.ndarray, factor: float, levels: Levels = EIGHT_BIT, rgb: bool = True
) -> np.ndarray:
    """Blend towards the mean grey level (luma for RGB, the mean of all bands otherwise)."""
    mean = np.float32(_gray(x).mean() if rgb else x.mean())
    return _q(x * np.float32(factor) + mean * np.float32(1.0 - factor), levels.ceiling)


def adjust_saturation(x: np.ndarray, factor: float, levels: Levels = EIGHT_BIT) -> np.ndarray:
    gray = _gray(x)[..., None]
    return _q(x * np.float32(factor) + gray * np.float32(1.0 - factor), levels.ceiling)


def _rgb_to_hsv(x: np.ndarray):
    """float RGB (..., 3) -> hue in [0, 1), saturation in [0, 1], value (same scale)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc = np.maximum(np.maximum(r, g), b)
    minc = np.minimum(np.minimum(r, g), b)
    delta = maxc - minc
    s = delta / np.maximum(maxc, np.float32(1e-12))
    inv = np.float32(1.0) / np.maximum(delta, np.float32(1e-12))
    h = np.where(
        maxc == r,
        (g - b) * inv,
        np.where(maxc == g, (b - r) * inv + np.float32(2.0), (r - g) * inv + np.float32(4.0)),
    )
    h = np.where(delta > 0, h * np.float32(1.0 / 6.0), np.float32(0.0))
    return h - np.floor(h), s, maxc


_HSV_OFFSETS = np.array([5.0, 3.0, 1.0], dtype=np.float32)


def _hsv_to_rgb(h, s, v):
    """Inverse of :func:`_rgb_to_hsv`: channel n = v - v*s*clip(min(k, 4-k), 0, 1),
    k = (n_off + 6h) mod 6 with n_off = 5, 3, 1 for R, G, B."""
    k = np.mod(_HSV_OFFSETS + (h * np.float32(6.0))[..., None], np.float32(6.0))
    w = np.clip(np.minimum(k, np.float32(4.0) - k), np.float32(0.0), np.float32(1.0))
    vs = (v * s)[..., None]
    return v[..., None] - vs * w


def adjust_hue(x: np.ndarray, factor: float, levels: Levels = EIGHT_BIT) -> np.ndarray:
    """Rotate the hue by ``factor`` of a full turn (albumentations: factor*360 deg)."""
    if factor == 0:
        return x
    h, s, v = _rgb_to_hsv(x)
    h = h + np.float32(factor)
    return _q(_hsv_to_rgb(h - np.floor(h), s, v), levels.ceiling)


_COLOUR_ONLY = (2, 3)  # saturation, hue: meaningless unless the bands are R, G, B


def color_jitter(
    x: np.ndarray, rng: np.random.Generator, levels: Levels = EIGHT_BIT, rgb: bool = True
) -> np.ndarray:
    """albumentations 1.x ColorJitter(0.4, 0.4, 0.2, 0.1): draw the four factors,
    then apply the ops in a random order (saturation and hue only for RGB)."""
    factors = (
        float(rng.uniform(*BRIGHTNESS)),
        float(rng.uniform(*CONTRAST)),
        float(rng.uniform(*SATURATION)),
        float(rng.uniform(*HUE)),
    )
    for op in rng.permutation(4):
        if op == 0:
            x = adjust_brightness(x, factors[0], levels)
        elif op == 1:
            x = adjust_contrast(x, factors[1], levels, rgb)
        elif rgb:
            x = (adjust_saturation, adjust_hue)[op - 2](x, factors[op], levels)
    return x


def gaussian_kernel(ksize: int, sigma: float) -> np.ndarray:
    """1-D Gaussian kernel as OpenCV ``getGaussianKernel`` (sigma > 0)."""
    k = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2.0
    g = np.exp(-(k * k) / (2.0 * sigma * sigma))
    return (g / g.sum()).astype(np.float32)


def gaussian_blur(
    x: np.ndarray, ksize: int, sigma: float, levels: Levels = EIGHT_BIT
) -> np.ndarray:
    """Separable Gaussian blur with reflect-101 borders (OpenCV default)."""
    kern = gaussian_kernel(ksize, sigma)
    r = ksize // 2
    h, w = x.shape[:2]
    pad = np.pad(x, ((r, r), (0, 0), (0, 0)), mode="reflect")
    tmp = kern[0] * pad[0:h]
    for i in range(1, ksize):
        tmp += kern[i] * pad[i : i + h]
    pad = np.pad(tmp, ((0, 0), (r, r), (0, 0)), mode="reflect")
    out = kern[0] * pad[:, 0:w]
    for i in range(1, ksize):
        out += kern[i] * pad[:, i : i + w]
    return _q(out, levels.ceiling)


def sample_blur_kernel(rng: np.random.Generator) -> int:
    """albumentations 1.x GaussianBlur kernel draw: k ~ U{3..7}; an even k becomes
    k + 1, so P(3) = 1/5, P(5) = P(7) = 2/5."""
    k = int(rng.integers(BLUR_KERNEL[0], BLUR_KERNEL[1] + 1))
    if k % 2 == 0:
        k = (k + 1) % (BLUR_KERNEL[1] + 1)
    return k


def gauss_noise(
    x: np.ndarray, rng: np.random.Generator, levels: Levels = EIGHT_BIT
) -> np.ndarray:
    """Gaussian noise, variance U[10, 50] on the 0-255 scale of the data's black-white span."""
    var = float(rng.uniform(*NOISE_VAR))
    std = math.sqrt(var) * (levels.white - levels.black) / 255.0
    noise = rng.standard_normal(x.shape, dtype=np.float32) * np.float32(std)
    return _q(x + noise, levels.ceiling)


def solarize(
    x: np.ndarray, threshold: float | None = None, levels: Levels = EIGHT_BIT
) -> np.ndarray:
    """Invert ``x -> black + white - x`` at and above ``threshold`` (None: 128/255 of the way
    from black to white: 128 for 8-bit data)."""
    if threshold is None:
        threshold = levels.black + (levels.white - levels.black) * SOLARIZE_THRESHOLD / 255.0
    inverted = np.float32(levels.black + levels.white) - x
    return _q(np.where(x >= threshold, inverted, x), levels.ceiling)


def to_gray(x: np.ndarray, levels: Levels = EIGHT_BIT) -> np.ndarray:
    g = _q(_gray(x), levels.ceiling)
    return np.repeat(g[..., None], 3, axis=-1)


def photometric_b(
    image: np.ndarray,
    rng: np.random.Generator,
    levels: Levels | None = None,
    rgb: bool | None = None,
) -> np.ndarray:
    """Crop-B photometric chain on an (H, W, C) uint8 / uint16 image; returns the same type.

    ``levels`` None = :func:`levels_for` the image type; ``rgb`` None = ``C == 3``. The draws
    before the noise are the same for any band count; the noise takes one per pixel and band.
    """
    if levels is None:
        levels = levels_for(image.dtype)
    if rgb is None:
        rgb = image.shape[2] == 3
    x = image.astype(np.float32)
    if rng.random() < P_COLOR_JITTER:
        x = color_jitter(x, rng, levels, rgb)
    ksize = sample_blur_kernel(rng)  # GaussianBlur p = 1.0
    sigma = float(rng.uniform(*BLUR_SIGMA))
    x = gaussian_blur(x, ksize, sigma, levels)
    if rng.random() < P_NOISE:
        x = gauss_noise(x, rng, levels)
    if rng.random() < P_SOLARIZE:
        x = solarize(x, levels=levels)
    if rng.random() < P_GRAY and rgb:
        x = to_gray(x, levels)
    return _round_to(x, image.dtype)


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
    image_uint8: np.ndarray,
    rng: np.random.Generator,
    image_size: int = 224,
    mask_ratio: float = 0.6,
    *,
    value_range: tuple[float, float] | None = None,
    rgb: bool | None = None,
) -> dict[str, np.ndarray]:
    """Both CMID views of one (H, W, C) uint8 or uint16 image (a 2-D image is grey RGB).

    Returns ``img_a``/``img_b`` (S, S, C) of the image's type, ``mask_a``/``mask_b`` bool
    (g, g) and ``loc_a``/``loc_b`` float32 (g, g, 2) with ``g = S // 32``. Draw order from
    ``rng``: crop A (box, flip), crop B (box, flip, photometric), mask A, mask B.
    ``value_range`` is the data's (black, white) for the photometric ops (None: 0 and the
    type maximum); ``rgb`` whether colour ops apply (None: ``C == 3``).
    """
    size = check_image_size(image_size)
    image = np.asarray(image_uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] < 1 or image.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"make_views expects an (H, W, C) uint8 or uint16 image, got {image.shape} "
            f"{image.dtype}"
        )
    levels = levels_for(image.dtype, value_range)
    image = pre_resize(image, size)
    height, width = image.shape[:2]
    grid = size // MASK_PATCH_SIZE

    crop_a = sample_crop(rng, height, width)
    img_a = apply_crop(image, crop_a, size)
    crop_b = sample_crop(rng, height, width)
    img_b = photometric_b(apply_crop(image, crop_b, size), rng, levels, rgb)
    mask_a = block_mask(rng, grid, mask_ratio)
    mask_b = block_mask(rng, grid, mask_ratio)
    return {
        "img_a": img_a,
        "img_b": img_b,
        "mask_a": mask_a,
        "mask_b": mask_b,
        "loc_a": location_grid(*crop_a, grid=grid),
        "loc_b": location_grid(*crop_b, grid=grid),
    }
