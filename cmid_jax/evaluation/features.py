"""Frozen-backbone features for evaluation: image cache, backbone variables, batched extractor.

Images are read once as pretraining reads its image files (a `FileSource` with the workdir's
`config.data.bands`: 8-bit RGB through `load_image` when it is None, else the selected raw bands),
checked against the model's band count and pixel type, center-resized to `config.data.image_size`
(shorter side resized with PIL bicubic, then the central square cropped: for square images this
is the pretraining pre-resize, per band for non-RGB / uint16 data) and kept as one
(N, S, S, bands) uint8 / uint16 array (`load_images`), or kept at their own size for the dense
protocols (`read_images`). Features are the global average pool of the backbone's last feature
map in float32, or the map itself (`make_feature_map_fn`, `FeatureExtractor(feature_map=True)`),
computed with BatchNorm in inference mode (running statistics) and the pretraining
normalisation `config.data.mean` / `config.data.std`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import types
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cmid_jax.data import FileSource, ImageError, bicubic_resize, num_bands
from cmid_jax.errors import DataError
from cmid_jax.models import cmid
from cmid_jax.pixels import normalize_pixels

WHICH = tuple(cmid.STATE_KEYS)  # 'student', 'teacher'


def center_resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) uint8 / uint16 -> (size, size, C) of the same type: bicubic resize of the shorter
    side, center crop."""
    h, w = image.shape[:2]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        image = bicubic_resize(image, nh, nw)  # As pretraining resamples.
        top, left = (nh - size) // 2, (nw - size) // 2
        image = image[top : top + size, left : left + size]
    return np.ascontiguousarray(image)


RGB8 = types.MappingProxyType({'bands': None, 'dtype': 'uint8'})  # `config.data` of 8-bit RGB.


class ModelImageReader:
    """`reader(i)`: `files[i]` as pretraining read its images (`FileSource` with `data.bands`).

    A file that lacks a band of `data.bands` or has another pixel type than `data.dtype` cannot
    feed the model (its stem and `data.mean` / `data.std` expect exactly those), so it raises
    `ImageError` naming the file, what it has and what the model's data settings expect. In 8-bit
    RGB mode every readable image fits, converted by `load_image` as in pretraining. `data` is the
    workdir's `config.data` (a config saved before pixel types were recorded is 8-bit).
    """

    def __init__(self, files: Sequence[str], data: Mapping = RGB8):
        bands = data.get('bands')
        self.bands = None if bands is None else tuple(bands)
        self.num_bands = num_bands(data)
        self.dtype = np.dtype(data.get('dtype') or 'uint8')
        self.files = list(files)
        self._expects = (
            f"the model's data settings (config.json) expect data.bands="
            f'{self.bands!r} ({self.num_bands} bands) of {self.dtype.name} pixels'
        )
        try:
            self._source = FileSource(self.files, self.bands)
        except ValueError as e:  # None of the first files has the bands.
            raise DataError(f'{e}\n{self._expects}') from e

    def __call__(self, index: int) -> np.ndarray:
        try:
            image = self._source.read(index)
        except ImageError as e:
            raise ImageError(e.path, f'{e.reason}; {self._expects}') from e
        if image.dtype != self.dtype:
            raise ImageError(self.files[index], f'has {image.dtype.name} pixels; {self._expects}')
        return image


def _map_threads(fn: Callable[[int], object], n: int, num_threads: int | None) -> list:
    workers = num_threads or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # PIL decodes without the GIL.
        return list(pool.map(fn, range(n)))


def load_images(
    files: Sequence[str], size: int, data: Mapping = RGB8, num_threads: int | None = None
) -> np.ndarray:
    """Reads (`ModelImageReader`) and center-resizes every file into one (N, size, size, bands)
    array of the model's pixel type; `data` is the workdir's `config.data`."""
    read = ModelImageReader(files, data)
    out = np.empty((len(files), size, size, read.num_bands), read.dtype)

    def load(i):
        out[i] = center_resize(read(i), size)

    _map_threads(load, len(files), num_threads)
    return out


def read_images(
    files: Sequence[str], data: Mapping = RGB8, num_threads: int | None = None
) -> list[np.ndarray]:
    """Every file at its own size, (H, W, bands) of the model's pixel type, read as
    `load_images` reads them (`ModelImageReader`); `data` is the workdir's `config.data`."""
    return _map_threads(ModelImageReader(files, data), len(files), num_threads)


def make_feature_map_fn(
    config: ml_collections.ConfigDict,
) -> Callable[[dict, jax.Array], jax.Array]:
    """`fn(variables, images) -> (B, h, w, C)` float32: the backbone's last feature map (stride
    `feature_stride`) of (B, S, S, bands) uint8 / uint16 images, normalised with
    `config.data.mean` / `std` and BatchNorm in inference mode. Not jitted: callers compose it."""
    nets = cmid.build_networks(config)
    mean, std = tuple(config.data.mean), tuple(config.data.std)

    def feature_map(variables, images):
        x = normalize_pixels(images, mean, std)
        fmap, _ = nets.apply('backbone', variables, x, train=False)
        return fmap.astype(jnp.float32)

    return feature_map


def pad_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """`batch` zero-padded along its first axis to `size` rows: one compiled shape for all."""
    if len(batch) == size:
        return batch
    return np.concatenate([batch, np.zeros((size - len(batch),) + batch.shape[1:], batch.dtype)])


@functools.lru_cache(maxsize=16)
def _jitted_features(
    config: ml_collections.FrozenConfigDict, feature_map: bool, out_sharding: NamedSharding | None
) -> Callable:
    """The jitted feature function, one per config: evaluations during pretraining build new
    extractors of the same model every time, and would otherwise compile it again each time."""
    fmap_fn = make_feature_map_fn(config)

    def features(variables, images):
        fmap = fmap_fn(variables, images)
        return fmap if feature_map else jnp.mean(fmap, axis=(1, 2))

    return (
        jax.jit(features) if out_sharding is None else jax.jit(features, out_shardings=out_sharding)
    )


class FeatureExtractor:
    """Batched, jitted (once) frozen-backbone features: `extractor(variables, images) -> (N, C)`,
    the global average pool of the last feature map, or with `feature_map=True` the map itself,
    (N, h, w, C).

    With a `mesh`, each batch is split over its `data` axis (the batch size is rounded up to a
    multiple of the device count) and the features come back replicated, so this also works when
    every process of a multi-host job calls it with the same images and replicated variables.
    Without one, it runs where the variables live.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        *,
        batch_size: int = 128,
        mesh: Mesh | None = None,
        feature_map: bool = False,
    ):
        if mesh is None:
            self._images_sharding = None
            out_sharding = None
        else:
            n_dev = mesh.devices.size
            batch_size = -(-batch_size // n_dev) * n_dev
            self._images_sharding = NamedSharding(mesh, P('data'))
            out_sharding = NamedSharding(mesh, P())
        self._fn = _jitted_features(
            ml_collections.FrozenConfigDict(config), feature_map, out_sharding
        )
        self.batch_size = batch_size

    def _put(self, batch: np.ndarray):
        if self._images_sharding is None:
            return batch
        # Works for shardings that span several processes, given the same array everywhere.
        return jax.make_array_from_callback(
            batch.shape, self._images_sharding, lambda idx: batch[idx]
        )

    def __call__(self, variables: dict, images: np.ndarray) -> np.ndarray:
        """(N, S, S, bands) uint8 / uint16 images -> (N, C) or (N, h, w, C) float32 features;
        the last batch is zero-padded."""
        n, bs = len(images), self.batch_size
        out = [
            self._fn(variables, self._put(pad_batch(images[start : start + bs], bs)))
            for start in range(0, n, bs)
        ]  # Dispatched without waiting.
        return np.concatenate([np.asarray(f) for f in jax.device_get(out)])[:n]
