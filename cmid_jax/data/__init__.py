"""Data loading for CMID pretraining: sources (files, GeoTIFF tiles, ArrayRecord, TFDS), bands
and value scale, the two views, and the grain pipeline. Start at :mod:`cmid_jax.data.sources`.

The names below are the package's interface for the rest of cmid_jax (evaluation reads labelled
images and resamples them as pretraining does); the modules behind them are internals."""

from __future__ import annotations

from cmid_jax.data.bands import is_rgb, num_bands, type_max
from cmid_jax.data.files import IMAGE_EXTENSIONS, demo_data_path, list_images, load_image
from cmid_jax.data.pipeline import (
    DecodeProcessSlice,
    FileSource,
    Source,
    build_dataset,
    make_iterator,
)
from cmid_jax.data.sources import describe_source, open_source
from cmid_jax.data.views import (
    bicubic_resize,
    location_grid,
    make_views,
    resized_crop,
    sample_crop_box,
)
from cmid_jax.errors import ImageError, TileRejected

__all__ = [
    'IMAGE_EXTENSIONS',
    'ImageError',
    'DecodeProcessSlice',
    'FileSource',
    'Source',
    'TileRejected',
    'bicubic_resize',
    'build_dataset',
    'demo_data_path',
    'describe_source',
    'is_rgb',
    'list_images',
    'load_image',
    'location_grid',
    'make_iterator',
    'make_views',
    'num_bands',
    'open_source',
    'resized_crop',
    'sample_crop_box',
    'type_max',
]
