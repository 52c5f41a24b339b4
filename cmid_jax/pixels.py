"""Pixel normalisation shared by training and evaluation: raw pixels to the network's input.

`normalize_pixels` maps uint8 / uint16 pixels to [0, 1] by their type's maximum and standardises
them per band with `config.data.mean` / `config.data.std` (`standardize_pixels`), as every
forward pass of the backbone expects its input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cmid_jax.data.bands import type_max


def standardize_pixels(x: jax.Array, mean, std) -> jax.Array:
    """Per band `(x - mean) / std` of [0, 1] pixels; `mean` / `std` are `config.data.mean/std`."""
    if len(mean) != x.shape[-1] or len(std) != x.shape[-1]:
        raise ValueError(
            f'data.mean / data.std have {len(mean)} / {len(std)} values, but the '
            f'images have {x.shape[-1]} bands'
        )
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def normalize_pixels(images: jax.Array, mean, std) -> jax.Array:
    """Pixels -> [0, 1] by their type's maximum (uint8 / 255 as ever, uint16 / 65535), then
    standardised per band."""
    return standardize_pixels(images.astype(jnp.float32) / type_max(images.dtype), mean, std)
