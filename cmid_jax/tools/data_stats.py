"""Per-band mean and std (and the value range) of the training data, for ``config.data.stats``.

    cmid-data-stats --config=configs/vitb.py --config.data.path=/data/scenes \\
        --config.data.tile_size=224 --config.data.bands='(0,1,2,3)' --out=stats.json \\
        [--samples=2000]

The data are read exactly as training reads them (same source, bands, tiles and nodata rejection,
before augmentation), over the first ``--samples`` elements of a permutation seeded with
``config.seed``; see :mod:`cmid_jax.data.stats` for what is computed and in which units. Then
train with ``--config.data.stats=stats.json`` (it sets ``data.mean``, ``data.std`` and, unless
given, ``data.value_range``; ``config.json`` records the numbers), or paste ``mean`` and ``std``
into the config.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from cmid_jax import errors
from cmid_jax.config_resolve import resolve
from cmid_jax.data.sources import source_stats
from cmid_jax.data.stats import write_stats

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file.', lock_config=True
)
_OUT = flags.DEFINE_string('out', None, 'JSON file to write.')
_SAMPLES = flags.DEFINE_integer('samples', 2000, 'Elements (images / tiles / records) to read.')
flags.mark_flags_as_required(['config', 'out'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    with errors.hint('check data.path and data.bands'):
        stats = source_stats(resolve(_CONFIG.value), _SAMPLES.value)
    try:
        write_stats(stats, _OUT.value)
    except OSError as e:
        raise errors.from_os_error(e, f'writing {_OUT.value}', errors.SaveError) from e
    print(json.dumps({k: stats[k] for k in ('mean', 'std', 'value_range', 'dtype', 'bands')}))
    print(
        f'{stats["elements_used"]} of {stats["elements_sampled"]} sampled elements used '
        f'({stats["rejected_nodata"]} rejected as nodata, {stats["unreadable"]} unreadable); '
        f'wrote {_OUT.value}. Train with --config.data.stats={_OUT.value}'
    )


def run() -> None:
    errors.run(main)


if __name__ == '__main__':
    run()
