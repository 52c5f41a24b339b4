"""Per-example random augmentation on the device: crop B's photometric chain and the block masks.

The host pipeline only decodes, crops and flips (`cmid_jax/data/views.py`). Everything drawn per
pixel or per block runs here, inside the jitted train step: on an accelerator it costs a fraction
of a millisecond per batch instead of most of a host core per few hundred images.

Crop B's chain follows the official `Pretrain/Dataset/transform.py` (albumentations 1.2.1), in
this order:
  ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, the four ops in random order (hue shifted in float HSV);
  GaussianBlur p=1, kernel 3/5/7 with probabilities 1/5, 2/5, 2/5 (albumentations' draw of an odd
    size from 3..7), sigma U[0.1, 2], reflect-101 borders;
  GaussNoise p=0.6, variance U[10, 50] on the 0-255 scale, per pixel and band;
  Solarize(128) p=0.2; ToGray p=0.2.
Each op rounds and clips back to the pixel grid after itself, as albumentations' uint8 ops do.
Crop A gets no photometric change. Block masks: exactly `ceil(g*g*ratio)` of the `g x g` blocks,
uniform without replacement, independently per crop.

Other data than 8-bit RGB: the ops use the data's `Levels` (black and white values; 0 and the
type maximum by default, so 8-bit data are unchanged): brightness and contrast act on all bands
(contrast blends towards the luma mean for RGB, the mean of all bands otherwise); saturation, hue
and ToGray run on RGB only; the noise's standard deviation scales by `(white - black) / 255`;
Solarize inverts `x -> black + white - x` above `black + (white - black) * 128 / 255`.

Randomness: one key per (seed, step, position in the global batch), so a batch is augmented the
same on any number of devices or hosts, and a resumed run repeats its steps exactly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cmid_jax.data.bands import type_max

BRIGHTNESS = (0.6, 1.4)
CONTRAST = (0.6, 1.4)
SATURATION = (0.8, 1.2)
HUE = (-0.1, 0.1)
P_COLOR_JITTER = 0.8
BLUR_SIGMA = (0.1, 2.0)
MAX_BLUR_RADIUS = 3  # Kernel 7.
P_NOISE = 0.6
NOISE_VAR = (10.0, 50.0)
P_SOLARIZE = 0.2
SOLARIZE_THRESHOLD = 128
P_GRAY = 0.2
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as OpenCV's COLOR_RGB2GRAY.
# Separates augmentation keys from the model-init key made from the same seed.
_AUGMENT_STREAM = 0x6175676D


class Levels(NamedTuple):
    """Value levels the photometric ops work with, in the data's raw units."""

    black: float = 0.0
    white: float = 255.0  # Noise and solarize scale with white - black.
    ceiling: float = 255.0  # Largest value of the pixel type; results are clipped to [0, ceiling].


def levels_for(dtype, value_range: tuple[float, float] | None = None) -> Levels:
    """Levels of `dtype` data whose black and white are `value_range` (None: 0 and the type
    maximum)."""
    ceiling = type_max(dtype)
    black, white = (0.0, ceiling) if value_range is None else map(float, value_range)
    if not 0 <= black < white:
        raise ValueError(
            f'data.value_range={value_range!r} must be (black, white), 0 <= black < white'
        )
    return Levels(black, white, ceiling)


class Draws(NamedTuple):
    """The random choices of crop B's photometric chain for one image."""

    jitter: jax.Array  # bool: ColorJitter applied.
    factors: jax.Array  # (4,) brightness, contrast, saturation, hue.
    order: jax.Array  # (4,) permutation of the four jitter ops (0..3 in the order above).
    blur_size: jax.Array  # int: 3, 5 or 7.
    blur_sigma: jax.Array
    noise: jax.Array  # bool: GaussNoise applied.
    noise_field: jax.Array  # (H, W, C) standard normal.
    noise_var: jax.Array  # On the 0-255 scale.
    solarize: jax.Array  # bool.
    gray: jax.Array  # bool (ignored unless RGB).


def step_key(seed: int, step: jax.Array) -> jax.Array:
    """The augmentation key of one train step."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _AUGMENT_STREAM), step)


def sample_draws(key: jax.Array, shape: tuple[int, int, int]) -> Draws:
    """Draws for one (H, W, C) image."""
    k = jax.random.split(key, 10)
    low = jnp.array([BRIGHTNESS[0], CONTRAST[0], SATURATION[0], HUE[0]], jnp.float32)
    high = jnp.array([BRIGHTNESS[1], CONTRAST[1], SATURATION[1], HUE[1]], jnp.float32)
    size = jax.random.randint(k[3], (), 3, 8)  # albumentations: 3..7, an even size becomes odd.
    return Draws(
        jitter=jax.random.uniform(k[0]) < P_COLOR_JITTER,
        factors=jax.random.uniform(k[1], (4,), minval=low, maxval=high),
        order=jax.random.permutation(k[2], 4),
        blur_size=jnp.where(size % 2 == 0, size + 1, size),
        blur_sigma=jax.random.uniform(k[4], (), minval=BLUR_SIGMA[0], maxval=BLUR_SIGMA[1]),
        noise=jax.random.uniform(k[5]) < P_NOISE,
        noise_field=jax.random.normal(k[6], shape, jnp.float32),
        noise_var=jax.random.uniform(k[7], (), minval=NOISE_VAR[0], maxval=NOISE_VAR[1]),
        solarize=jax.random.uniform(k[8]) < P_SOLARIZE,
        gray=jax.random.uniform(k[9]) < P_GRAY,
    )


# ----------------------------------------------------------------------------------- ops
# Every op takes and returns float32 pixel values of one (H, W, C) image on the pixel grid.


def _q(x: jax.Array, levels: Levels) -> jax.Array:
    """Round (half to even, as np.rint) and clip to the pixel grid [0, ceiling]."""
    return jnp.clip(jnp.round(x), 0.0, levels.ceiling)


def _luma(x: jax.Array) -> jax.Array:
    return x @ jnp.asarray(GRAY_WEIGHTS, jnp.float32)


def adjust_brightness(x, factor, levels: Levels):
    return _q(x * factor, levels)


def adjust_contrast(x, factor, levels: Levels, rgb: bool):
    mean = jnp.mean(_luma(x)) if rgb else jnp.mean(x)
    return _q(x * factor + mean * (1.0 - factor), levels)


def adjust_saturation(x, factor, levels: Levels):
    return _q(x * factor + _luma(x)[..., None] * (1.0 - factor), levels)


def _rgb_to_hsv(x):
    """Float RGB (..., 3) -> hue in [0, 1), saturation in [0, 1], value (same scale as x)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc = jnp.maximum(jnp.maximum(r, g), b)
    delta = maxc - jnp.minimum(jnp.minimum(r, g), b)
    s = delta / jnp.maximum(maxc, 1e-12)
    inv = 1.0 / jnp.maximum(delta, 1e-12)
    h = jnp.where(
        maxc == r, (g - b) * inv, jnp.where(maxc == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0)
    )
    h = jnp.where(delta > 0, h / 6.0, 0.0)
    return h - jnp.floor(h), s, maxc


def _hsv_to_rgb(h, s, v):
    """Channel n = v - v*s*clip(min(k, 4 - k), 0, 1), k = (n_off + 6h) mod 6, n_off = 5, 3, 1."""
    k = jnp.mod(jnp.array([5.0, 3.0, 1.0], jnp.float32) + (h * 6.0)[..., None], 6.0)
    w = jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
    return v[..., None] - (v * s)[..., None] * w


def adjust_hue(x, factor, levels: Levels):
    """Rotates the hue by `factor` of a full turn (albumentations: factor * 360 degrees)."""
    h, s, v = _rgb_to_hsv(x)
    h = h + factor
    return jnp.where(factor == 0, x, _q(_hsv_to_rgb(h - jnp.floor(h), s, v), levels))


def color_jitter(x, factors, order, levels: Levels, rgb: bool):
    """The four jitter ops in `order`; saturation and hue leave non-RGB data unchanged."""
    ops = [
        lambda y: adjust_brightness(y, factors[0], levels),
        lambda y: adjust_contrast(y, factors[1], levels, rgb),
    ]
    if rgb:
        ops += [
            lambda y: adjust_saturation(y, factors[2], levels),
            lambda y: adjust_hue(y, factors[3], levels),
        ]
    else:
        ops += [lambda y: y, lambda y: y]
    for op in order:  # Batched over images, each switch evaluates all four ops and selects.
        x = jax.lax.switch(op, ops, x)
    return x


def blur_kernel(size, sigma) -> jax.Array:
    """(7,) Gaussian taps (OpenCV getGaussianKernel) of an odd `size` <= 7, zero-padded to 7."""
    t = jnp.arange(-MAX_BLUR_RADIUS, MAX_BLUR_RADIUS + 1, dtype=jnp.float32)
    g = jnp.where(jnp.abs(t) <= size // 2, jnp.exp(-t * t / (2.0 * sigma * sigma)), 0.0)
    return g / jnp.sum(g)


def gaussian_blur(x, size, sigma, levels: Levels):
    """Separable blur with reflect-101 borders (OpenCV's default). Zero taps pad the kernel to 7,
    and reflect-101 padding is the same at every width, so each size gives OpenCV's result."""
    kernel, r = blur_kernel(size, sigma), MAX_BLUR_RADIUS
    h, w = x.shape[:2]
    pad = jnp.pad(x, ((r, r), (0, 0), (0, 0)), mode='reflect')
    x = sum(kernel[i] * pad[i : i + h] for i in range(2 * r + 1))
    pad = jnp.pad(x, ((0, 0), (r, r), (0, 0)), mode='reflect')
    x = sum(kernel[i] * pad[:, i : i + w] for i in range(2 * r + 1))
    return _q(x, levels)


def gauss_noise(x, field, variance, levels: Levels):
    std = jnp.sqrt(variance) * ((levels.white - levels.black) / 255.0)
    return _q(x + field * std, levels)


def solarize(x, levels: Levels):
    threshold = levels.black + (levels.white - levels.black) * SOLARIZE_THRESHOLD / 255.0
    return _q(jnp.where(x >= threshold, levels.black + levels.white - x, x), levels)


def to_gray(x, levels: Levels):
    return jnp.repeat(_q(_luma(x), levels)[..., None], 3, axis=-1)


def photometric(x: jax.Array, d: Draws, levels: Levels, rgb: bool) -> jax.Array:
    """Crop B's chain on one (H, W, C) float image of pixel values, with the draws `d`."""
    x = jnp.where(d.jitter, color_jitter(x, d.factors, d.order, levels, rgb), x)
    x = gaussian_blur(x, d.blur_size, d.blur_sigma, levels)
    x = jnp.where(d.noise, gauss_noise(x, d.noise_field, d.noise_var, levels), x)
    x = jnp.where(d.solarize, solarize(x, levels), x)
    if rgb:
        x = jnp.where(d.gray, to_gray(x, levels), x)
    return x


# --------------------------------------------------------------------------------- masks
def mask_count(grid: int, ratio: float) -> int:
    """`ceil(grid * grid * ratio)`, robust to float noise (0.6 * 49 is not 29.4 exactly)."""
    n = grid * grid
    return min(n, max(0, math.ceil(round(n * ratio, 9))))


def block_mask(key: jax.Array, grid: int, ratio: float) -> jax.Array:
    """Bool (grid, grid), True = masked: `mask_count` cells uniformly without replacement."""
    n = grid * grid
    chosen = jnp.argsort(jax.random.uniform(key, (n,)))[: mask_count(grid, ratio)]
    return jnp.zeros((n,), bool).at[chosen].set(True).reshape(grid, grid)


# --------------------------------------------------------------------------------- batch
def augment_batch(
    batch: dict,
    key: jax.Array,
    *,
    mask_ratio: float,
    mask_patch: int,
    value_range: tuple[float, float] | None = None,
    rgb: bool | None = None,
) -> dict:
    """The pipeline's batch (`img_a`, `img_b` (B, S, S, C) uint8/uint16 crops) -> float32 pixel
    values `img_a` and photometric `img_b` plus bool block masks `mask_a`, `mask_b` (B, g, g).

    `value_range` is the data's (black, white) (None: 0 and the type maximum); `rgb` whether the
    colour ops apply (None: 3 bands). Example `i` draws from `fold_in(key, i)`: the global batch
    position, whatever the sharding.
    """
    images = batch['img_b']
    levels = levels_for(images.dtype, value_range)
    rgb = images.shape[-1] == 3 if rgb is None else rgb
    if rgb and images.shape[-1] != 3:
        raise ValueError(f'data.rgb is set, but the images have {images.shape[-1]} bands')
    grid = images.shape[1] // mask_patch
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))

    def one(k, image):
        k_photo, k_a, k_b = jax.random.split(k, 3)
        x = image.astype(jnp.float32)
        return (
            photometric(x, sample_draws(k_photo, image.shape), levels, rgb),
            block_mask(k_a, grid, mask_ratio),
            block_mask(k_b, grid, mask_ratio),
        )

    img_b, mask_a, mask_b = jax.vmap(one)(keys, images)
    return {
        'img_a': batch['img_a'].astype(jnp.float32),
        'img_b': img_b,
        'mask_a': mask_a,
        'mask_b': mask_b,
    }
