"""Numpy reference of crop B's photometric ops, for checking `cmid_jax.augment` (test-only).

An independent implementation: loops over taps and explicit reflect padding instead of vector
code, float64 kernels, OpenCV's formulas written out. `Levels` come from the code under test
(they are plain numbers). Every op rounds and clips to the pixel grid, like albumentations'
uint8 ops.
"""

from __future__ import annotations

import numpy as np

_GRAY = np.array([0.299, 0.587, 0.114], np.float32)


def q(x, levels):
    return np.clip(np.rint(x), 0.0, levels.ceiling).astype(np.float32)


def brightness(x, f, levels):
    return q(x * np.float32(f), levels)


def contrast(x, f, levels, rgb):
    mean = np.float32((x @ _GRAY).mean() if rgb else x.mean())
    return q(x * np.float32(f) + mean * np.float32(1 - f), levels)


def saturation(x, f, levels):
    gray = (x @ _GRAY)[..., None]
    return q(x * np.float32(f) + gray * np.float32(1 - f), levels)


def hue(x, f, levels):
    """Per-pixel colorsys-style HSV round trip with the hue rotated by `f` turns."""
    import colorsys

    flat = x.reshape(-1, 3).astype(np.float64) / levels.ceiling
    out = np.empty_like(flat)
    for i, (r, g, b) in enumerate(flat):
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        out[i] = colorsys.hsv_to_rgb((h + f) % 1.0, s, v)
    return q(out.reshape(x.shape) * levels.ceiling, levels)


def gaussian_blur(x, size, sigma, levels):
    """OpenCV getGaussianKernel + sepFilter2D with BORDER_REFLECT_101."""
    t = np.arange(size) - (size - 1) / 2.0
    k = np.exp(-t * t / (2.0 * sigma * sigma))
    k /= k.sum()
    r = size // 2
    h, w = x.shape[:2]

    def reflect(i, n):  # reflect-101: -1 -> 1, n -> n - 2
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    rows = np.zeros(x.shape, np.float64)
    for y in range(h):
        for j in range(size):
            rows[y] += k[j] * x[reflect(y + j - r, h)]
    out = np.zeros(x.shape, np.float64)
    for c in range(w):
        for j in range(size):
            out[:, c] += k[j] * rows[:, reflect(c + j - r, w)]
    return q(out, levels)


def gauss_noise(x, field, var, levels):
    std = np.sqrt(var) * (levels.white - levels.black) / 255.0
    return q(x + field * std, levels)


def solarize(x, levels):
    threshold = levels.black + (levels.white - levels.black) * 128 / 255.0
    return q(np.where(x >= threshold, levels.black + levels.white - x, x), levels)


def to_gray(x, levels):
    return np.repeat(q(x @ _GRAY, levels)[..., None], 3, axis=-1)


def photometric(x, d, levels, rgb):
    """The chain with the draws `d` (numpy values of `cmid_jax.augment.Draws`)."""
    x = x.astype(np.float32)
    if d.jitter:
        for op in d.order:
            f = float(d.factors[op])
            if op == 0:
                x = brightness(x, f, levels)
            elif op == 1:
                x = contrast(x, f, levels, rgb)
            elif rgb:
                x = saturation(x, f, levels) if op == 2 else hue(x, f, levels)
    x = gaussian_blur(x, int(d.blur_size), float(d.blur_sigma), levels)
    if d.noise:
        x = gauss_noise(x, d.noise_field, float(d.noise_var), levels)
    if d.solarize:
        x = solarize(x, levels)
    if d.gray and rgb:
        x = to_gray(x, levels)
    return x
