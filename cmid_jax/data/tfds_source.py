"""A prepared TensorFlow Datasets dataset as a pipeline source: ``data.source='tfds:NAME:SPLIT'``.

``NAME`` may carry a builder config (``eurosat/rgb``) and ``SPLIT`` may be any TFDS split string
(``train``, ``train[:80%]``). The dataset must already be prepared in the ``array_record`` file
format under ``data.path`` (TFDS's ``data_dir``; None = TFDS's default, ``~/tensorflow_datasets``):
e.g. ``tfds build eurosat/rgb --file_format=array_record`` once. Nothing is downloaded at training
time. Reading goes through ``tfds.data_source`` (random access), which needs the
``tensorflow-datasets`` package but not TensorFlow: images stored as JPEG/PNG are decoded with PIL.

The image is the feature called ``image`` or else the only image-like (3-D) feature; labels and
other features are ignored. The image goes through the same band rules as files (8-bit RGB, or
``data.bands`` by 0-based index; TFDS features have no band names).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cmid_jax.data.bands import check_bands_setting, compact, compact_dtype, resolve_bands, select
from cmid_jax.data.files import to_rgb_uint8
from cmid_jax.errors import ConfigError, DataError, ImageError

PREFIX = 'tfds:'


def parse_spec(spec: str) -> tuple[str, str]:
    """``'tfds:NAME[/CONFIG]:SPLIT'`` -> (``'NAME[/CONFIG]'``, ``'SPLIT'``)."""
    body = spec[len(PREFIX) :] if spec.startswith(PREFIX) else ''
    name, sep, split = body.partition(':')
    if not spec.startswith(PREFIX) or not name or not sep or not split:
        raise ConfigError(
            f"data.source={spec!r}: expected 'tfds:NAME[/CONFIG]:SPLIT', e.g. "
            f"'tfds:eurosat/rgb:train' or 'tfds:resisc45:train[:80%]'"
        )
    return name, split


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(
            "data.source='tfds:...' needs tensorflow-datasets: pip install 'cmid-jax[tfds]'"
        ) from e
    return tfds


def _image_key(features, spec: str) -> str:
    """The image feature: ``image`` if present, else the only feature of rank 3."""
    keys = list(features.keys())
    if 'image' in keys:
        return 'image'
    images = [k for k in keys if len(getattr(features[k], 'shape', ()) or ()) == 3]
    if len(images) != 1:
        raise DataError(
            f'data.source={spec!r}: cannot tell the image feature among {keys} '
            f"(none is called 'image' and {len(images)} have rank 3)"
        )
    return images[0]


class TfdsSource:
    unit = 'records'

    def __init__(
        self, spec: str, *, data_dir: str | None = None, bands: Sequence[int | str] | None = None
    ):
        self.spec = spec
        self.name, self.split = parse_spec(spec)
        self.data_dir = data_dir
        self.bands = check_bands_setting(bands)
        source = self._source()
        self._len = len(source)
        if self._len < 1:
            raise DataError(f'data.source={spec!r} has no examples')
        feature = source.dataset_info.features[self.key]
        shape = tuple(feature.shape)
        channels = shape[-1] if shape and shape[-1] is not None else None
        if self.bands is None:
            self.indices = None
            self.dtype, self.num_bands = np.dtype(np.uint8), 3
        else:
            if channels is None:
                raise DataError(
                    f'data.source={spec!r}: feature {self.key!r} has an unknown band '
                    f'count {shape}; data.bands needs a fixed one'
                )
            self.indices = resolve_bands(self.bands, [None] * channels, spec)
            self.dtype = compact_dtype(np.dtype(feature.np_dtype))
            self.num_bands = len(self.indices)

    def _source(self):
        if getattr(self, '_data', None) is None:
            tfds = _tfds()
            try:
                self._data = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir)
            except Exception as e:
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else ''
                raise DataError(  # TFDS's own message goes on to list its whole catalogue
                    f'data.source={self.spec!r}: cannot open {self.name!r} split {self.split!r} in '
                    f'data_dir={self.data_dir!r} ({type(e).__name__}: {first_line}). It must be '
                    f'prepared beforehand in the array_record format, e.g. `tfds build {self.name} '
                    f'--file_format=array_record`.'
                ) from e
            self.key = _image_key(self._data.dataset_info.features, self.spec)
        return self._data

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state['_data'] = None  # reopened lazily in each worker process
        return state

    def __len__(self) -> int:
        return self._len

    def describe(self, index: int) -> str:
        return f'{self.spec} example {index}'

    def read(self, index: int) -> np.ndarray:
        where = self.describe(index)
        try:
            image = np.asarray(self._source()[index][self.key])
        except Exception as e:
            raise ImageError(where, f'{type(e).__name__}: {e}') from e
        if image.ndim == 2:
            image = image[:, :, None]
        if self.indices is None:
            return to_rgb_uint8(image, where)
        return compact(select(image, self.indices), where)
