"""Per-band statistics of a data source: computed by ``python -m cmid_jax.tools.data_stats``, read back
through ``config.data.stats``.

The statistics are exact over a seeded sample of elements (images, tiles or records, before any
augmentation): per band, a histogram of every valid pixel (uint8: 256 bins, uint16: 65,536 bins)
is accumulated, and mean, standard deviation and percentiles come from it, so the result does not
depend on the order of the elements and streams in constant memory. Pixels whose bands are all 0
(nodata) are left out, and so are tiles and images rejected by ``data.max_nodata``.

``mean`` and ``std`` are in the units the device normalises with: value / type maximum (255 for
uint8, 65535 for uint16; :func:`cmid_jax.data.bands.type_max`). ``value_range`` is the (black,
white) of the photometric augmentations: (0, 255) for 8-bit data (the official behaviour), for
16-bit data the 0.1st and 99.9th percentiles over all bands.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from cmid_jax.data.bands import type_max, valid_mask
from cmid_jax.data.tagged_json import read_tagged_json
from cmid_jax.errors import ConfigError, DataError, ImageError, TileRejected

log = logging.getLogger(__name__)

FORMAT = 'cmid_jax.data_stats/1'
PERCENTILES = (0.1, 1.0, 50.0, 99.0, 99.9)
_MAX_REASONS = 20  # unreadable elements listed in the JSON


def _percentile(hist: np.ndarray, q: float) -> int:
    """Smallest value v with at least q% of the counts <= v (nearest rank)."""
    cdf = np.cumsum(hist)
    return int(np.searchsorted(cdf, q / 100.0 * cdf[-1], side='left'))


def compute_stats(source, *, samples: int, seed: int) -> dict[str, Any]:
    """Statistics of ``samples`` elements of ``source`` (all of them if it has fewer), drawn
    as the first ``samples`` of a permutation seeded with ``seed``.

    Raises:
      DataError: no valid pixel in the sample.
    """
    if samples < 1:
        raise ConfigError(f'samples={samples} must be positive')
    n = len(source)
    order = np.random.default_rng(int(seed) % 2**32).permutation(n)[:samples]
    bins = int(type_max(source.dtype)) + 1
    hist = np.zeros((source.num_bands, bins), np.int64)
    used = rejected = nodata_pixels = 0
    unreadable: list[dict[str, str]] = []
    for count, index in enumerate(order, 1):
        try:
            image = source.read(int(index))
        except TileRejected:
            rejected += 1
            continue
        except ImageError as e:
            log.warning('skipping %s', e)
            unreadable.append({'element': source.describe(int(index)), 'reason': str(e)})
            continue
        valid = valid_mask(image)
        nodata_pixels += int(valid.size - valid.sum())
        pixels = image[valid]
        for b in range(source.num_bands):
            hist[b] += np.bincount(pixels[:, b], minlength=bins)
        used += 1
        if count % 1000 == 0:
            log.info('%d of %d elements read', count, len(order))
    total = int(hist[0].sum())
    if total == 0:
        raise DataError(
            f'no valid pixel in {len(order)} sampled {source.unit} '
            f'({rejected} rejected as nodata, {len(unreadable)} unreadable)'
        )
    values = np.arange(bins, dtype=np.float64)
    mean_raw = hist @ values / total
    var_raw = (hist * np.square(values[None, :] - mean_raw[:, None])).sum(axis=1) / total
    std_raw = np.sqrt(var_raw)
    scale = type_max(source.dtype)
    percentiles = {f'{q:g}': [_percentile(h, q) for h in hist] for q in PERCENTILES}
    if source.dtype == np.uint8:
        value_range = [0.0, 255.0]
    else:
        value_range = [float(min(percentiles['0.1'])), float(max(percentiles['99.9']))]
    return {
        'format': FORMAT,
        'mean': [float(v) for v in mean_raw / scale],
        'std': [float(v) for v in std_raw / scale],
        'unit': f'value / {scale:g}',
        'value_range': value_range,
        'dtype': source.dtype.name,
        'num_bands': int(source.num_bands),
        'mean_raw': [float(v) for v in mean_raw],
        'std_raw': [float(v) for v in std_raw],
        'percentiles_raw': percentiles,
        'elements_sampled': int(len(order)),
        'elements_used': used,
        'rejected_nodata': rejected,
        'unreadable': len(unreadable),
        'unreadable_examples': unreadable[:_MAX_REASONS],
        'pixels': total,
        'nodata_pixels': nodata_pixels,
        'seed': int(seed),
    }


def write_stats(stats: dict[str, Any], path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(stats, f, indent=2)
        f.write('\n')


def load_stats(path: str) -> dict[str, Any]:
    """A statistics file of `cmid_jax.tools.data_stats`, checked for the keys a run reads."""
    return read_tagged_json(
        path, FORMAT, ('mean', 'std', 'value_range', 'dtype', 'bands'), f'data.stats={path!r}'
    )
