"""The pixel normalisation that training and evaluation share (`cmid_jax.pixels`)."""

import numpy as np
import pytest

from cmid_jax import pixels


def test_normalize_pixels_by_type_and_band():
    mean, std = (0.5, 0.25), (0.5, 0.25)
    u8 = np.array([[[0, 255]]], np.uint8)
    np.testing.assert_allclose(pixels.normalize_pixels(u8, mean, std), [[[-1.0, 3.0]]])
    u16 = np.array([[[65535, 0]]], np.uint16)
    np.testing.assert_allclose(pixels.normalize_pixels(u16, mean, std), [[[1.0, -1.0]]])
    with pytest.raises(ValueError, match=r'have 3 / 3 values, but the images have 2 bands'):
        pixels.normalize_pixels(u8, (0.5,) * 3, (0.5,) * 3)
