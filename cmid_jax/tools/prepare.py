"""Converts a folder of images or GeoTIFF scenes into ArrayRecord shards (`cmid-prepare`).

    cmid-prepare --src=DIR --out=DIR [--tile=N] [--bands=0,1,2,3] [--max_nodata=0.25] \
        [--records_per_shard=4096] [--workers=4]

Then train with `--config.data.path=OUT`; see `cmid_jax.data.shards`.
"""

import os

from absl import app, flags

from cmid_jax import errors
from cmid_jax.data import records
from cmid_jax.data.shards import prepare

_SRC = flags.DEFINE_string('src', None, 'Folder of images or scenes (any nesting).')
_OUT = flags.DEFINE_string('out', None, 'Output folder for the shards and manifest.json.')
_TILE = flags.DEFINE_integer('tile', 0, '0 = whole images; N = NxN windows.', lower_bound=0)
_BANDS = flags.DEFINE_list(
    'bands', None, 'Comma-separated 0-based indices or names to keep (default: all).'
)
_MAX_NODATA = flags.DEFINE_float(
    'max_nodata', 0.25, 'Drop tiles with a larger fraction of nodata pixels (tiles only).'
)
_RECORDS_PER_SHARD = flags.DEFINE_integer('records_per_shard', 4096, 'Records per shard.')
_WORKERS = flags.DEFINE_integer('workers', min(4, os.cpu_count() or 1), 'Reader threads.')
flags.mark_flags_as_required(['src', 'out'])


def parse_bands(values: list[str] | None) -> tuple[int | str, ...] | None:
    """`['3', 'red']` -> `(3, 'red')`: digits are 0-based indices, anything else a band name."""
    if not values:
        return None
    return tuple(int(b) if b.strip().isdigit() else b.strip() for b in values if b.strip())


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    with errors.hint('check --src, --bands and --tile'):
        m = prepare(
            _SRC.value,
            _OUT.value,
            tile=_TILE.value,
            bands=parse_bands(_BANDS.value),
            max_nodata=_MAX_NODATA.value,
            records_per_shard=_RECORDS_PER_SHARD.value,
            workers=_WORKERS.value,
        )
    print(
        f'wrote {m["records"]} records ({m["bands"]} x {m["dtype"]}, '
        f'{"tiles of " + str(m["tile_size"]) if m["tile_size"] else "whole images"}) in '
        f'{len(m["shards"])} shards to {_OUT.value} in {m["seconds"]:.1f} s '
        f'({m["records"] / max(m["seconds"], 1e-9):.0f} records/s); '
        f'{m["skipped_count"]} skipped, {m["rejected_nodata"]} rejected as nodata '
        f'(reasons in {os.path.join(_OUT.value, records.MANIFEST)})'
    )


def run() -> None:
    errors.run(main)


if __name__ == '__main__':
    run()
