"""Cut the public-domain Landsat-8 crops into the small demo tiles of ``cmid_jax/demo_data``.

    python -m cmid_jax.tools.make_demo_tiles --src=/path/to/geotiff --out=cmid_jax/demo_data

For every ``landsat8_*.tif`` in ``--src`` (uint16, 3 bands) the image is cut into a
grid of non-overlapping ``--tile`` x ``--tile`` tiles (row-major). Crops with no
nodata (the 1024 crop) keep only a checkerboard half of their tiles (tile row + tile
column even) so the set stays under ~3 MB; crops with nodata pixels (all bands 0:
the 512 edge crop) keep all their tiles. ``--all`` keeps every tile of every crop.
Tiles are written as plain uint16 RGB TIFFs (no GeoTIFF tags) with deflate (zlib)
compression and horizontal predictor, which tifffile reads without extra packages.
The raw digital numbers are kept; ``load_image`` stretches them to uint8.
"""

from __future__ import annotations

import glob
import os

import numpy as np
from absl import app, flags

from cmid_jax import errors
from cmid_jax.errors import DataError


def cut_tiles(image: np.ndarray, tile: int, checkerboard: bool):
    """Yield ``(top, left, tile_array)`` for the kept tiles of an (H, W, C) image."""
    rows, cols = image.shape[0] // tile, image.shape[1] // tile
    for r in range(rows):
        for c in range(cols):
            if checkerboard and (r + c) % 2:
                continue
            top, left = r * tile, c * tile
            yield top, left, np.ascontiguousarray(image[top : top + tile, left : left + tile])


def make_demo_tiles(src: str, out: str, tile: int = 256, keep_all: bool = False) -> list[str]:
    import tifffile

    sources = sorted(glob.glob(os.path.join(src, 'landsat8_*.tif')))
    if not sources:
        raise DataError(f'no landsat8_*.tif files in {src!r}')
    os.makedirs(out, exist_ok=True)
    written = []
    for path in sources:
        image = tifffile.imread(path)
        if image.ndim != 3 or image.shape[2] < 3:
            raise DataError(f'{path}: expected (H, W, >=3) bands, got {image.shape}')
        image = image[:, :, :3]
        has_nodata = bool(np.all(image == 0, axis=2).any())
        checkerboard = not keep_all and not has_nodata
        stem = os.path.splitext(os.path.basename(path))[0]
        for top, left, t in cut_tiles(image, tile, checkerboard):
            name = os.path.join(out, f'{stem}_y{top:04d}_x{left:04d}.tif')
            tifffile.imwrite(
                name,
                t,
                photometric='rgb',
                compression='zlib',
                compressionargs={'level': 9},
                predictor=True,
                metadata=None,
            )
            written.append(name)
    return written


_SRC = flags.DEFINE_string('src', None, 'Folder with landsat8_*.tif crops.')
_OUT = flags.DEFINE_string('out', None, 'Output folder (e.g. cmid_jax/demo_data).')
_TILE = flags.DEFINE_integer('tile', 256, 'Tile side in pixels.')
_ALL = flags.DEFINE_bool('all', False, 'Keep every tile (about 4.8 MB).')
flags.mark_flags_as_required(['src', 'out'])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    written = make_demo_tiles(_SRC.value, _OUT.value, _TILE.value, _ALL.value)
    total = sum(os.path.getsize(p) for p in written)
    print(f'wrote {len(written)} tiles, {total / 1e6:.2f} MB, to {_OUT.value}')


if __name__ == '__main__':
    errors.run(main)
