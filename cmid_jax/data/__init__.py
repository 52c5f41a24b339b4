"""Data loading for CMID pretraining: file discovery/decoding, the two views, grain."""

from __future__ import annotations

import os

from cmid_jax.data.files import IMAGE_EXTENSIONS, ImageError, list_images, load_image
from cmid_jax.data.pipeline import DecodeProcessSlice, build_dataset, make_iterator
from cmid_jax.data.views import block_mask, location_grid, make_views


def demo_data_path() -> str:
    """Folder of the built-in demo tiles (Landsat-8 uint16 TIFFs, public domain; see
    ``cmid_jax/demo_data/ATTRIBUTION.md``)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo_data")


__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageError",
    "DecodeProcessSlice",
    "block_mask",
    "build_dataset",
    "demo_data_path",
    "list_images",
    "load_image",
    "location_grid",
    "make_iterator",
    "make_views",
]
