"""One resolved config: every derived value and every check, once, before anything is traced.

`resolve(config, source)` returns the frozen config that the run, its config.json, the train step
and the evaluations read. It fills in what the config leaves to the data (`data.path`,
`data.dtype`, `data.mean` / `data.std` from `data.stats`, `data.value_range`, `data.rgb`), the
run length (`steps_per_epoch`, `total_steps`) and the model's `local_use_bn`, and rejects values
that cannot work, alone or together, in one ConfigError that lists them all. Nothing else changes a
config: the one place that defines defaults is `cmid_jax.config_base`.

Settings that depend on the device the step is compiled for (`model.attention_impl='auto'`,
`model.remat='auto'`) keep the requested value here and are chosen when the step is built for that
device (`cmid_jax.models.attention`, `cmid_jax.models.remat`).

`resume_changes` compares the config of a resumed run with the workdir's config.json and stops on
a change that would mix two different runs in one state.
"""

from __future__ import annotations

import json
import math
from typing import Any

import ml_collections

from cmid_jax.data import demo_data_path, num_bands, type_max
from cmid_jax.data.bands import check_bands_setting
from cmid_jax.data.pipeline import Source
from cmid_jax.data.stats import load_stats
from cmid_jax.data.tfds_source import parse_spec as parse_tfds_spec
from cmid_jax.errors import ConfigError, DataError, WorkdirError
from cmid_jax.models import BACKBONES, backbone_module
from cmid_jax.models.attention import IMPLEMENTATIONS
from cmid_jax.models.cmid import COMPUTE_DTYPES
from cmid_jax.models.remat import CHOICES as REMAT_CHOICES

# Fields a resumed run may change: run length, logging and evaluation cadence, checkpoint
# retention, host-side workers, the data location (its kind is still checked through bands,
# dtype, mean/std and steps_per_epoch), the attention kernel and the remat policy (the same
# computation on another device). Every other field changes the state's structure or meaning.
MAY_CHANGE_ON_RESUME = (
    'total_steps',
    'epochs',
    'log_every_steps',
    'images_every_steps',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'max_nonfinite_steps',
    'data.num_workers',
    'data.path',
    'data.source',
    'eval.',
    'model.attention_impl',
    'model.remat',  # What the backward pass recomputes: memory and time, not the state or values.
)
# Fields the run fills in from the data when the config leaves them None; a None in config.json
# (e.g. written by cmid-import-torch) is not a change.
RESOLVED_AT_START = (
    'data.dtype',
    'data.value_range',
    'data.rgb',
    'model.local_use_bn',
    'steps_per_epoch',
)


def resolve(
    config: ml_collections.ConfigDict,
    source: Source | None = None,
    *,
    num_devices: int | None = None,
    num_processes: int = 1,
) -> ml_collections.FrozenConfigDict:
    """The resolved, frozen copy of `config` (the module docstring says what is filled in).

    `source` is the opened training data (`cmid_jax.data.open_source`); None leaves the
    data-derived fields as they are (a workdir's config.json, resolved when it was written).
    `num_devices` / `num_processes` check that the batch splits over the run's mesh (None: not
    checked, e.g. for evaluation). `config` itself is not changed.

    Raises:
      ConfigError: one line listing every value that cannot work, each naming the field, its value
        and what it must be.
      DataError: a setting that does not fit the data, naming the key, its value and what the data
        needs.
    """
    c = editable(config)  # Resolving a resolved config again changes nothing.
    _check_values(c, num_devices, num_processes)
    if source is not None:
        _resolve_data(c.data, source)
        c.steps_per_epoch = c.steps_per_epoch or max(len(source) // c.batch_size, 1)
        if c.total_steps is None:
            c.total_steps = c.epochs * c.steps_per_epoch
    d = c.data
    if d.get('rgb') and num_bands(d) != 3:
        raise ConfigError(f'data.rgb=True needs 3 bands, but data.bands={d.bands!r}')
    d.rgb = bool(d.rgb) if d.get('rgb') is not None else num_bands(d) == 3
    m = c.model
    if m.get('local_use_bn') is None:
        # The official local head has BN exactly for the CNN backbones (use_bn: True for ResNet).
        m.local_use_bn = backbone_module(m.arch).HAS_BATCH_NORM
    return ml_collections.FrozenConfigDict(c)


def editable(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An unfrozen copy of `config`, resolved or not, with its references resolved."""
    if isinstance(config, ml_collections.FrozenConfigDict):
        return config.as_configdict()
    return config.copy_and_resolve_references()


def override(
    config: ml_collections.FrozenConfigDict, changes: dict[str, Any]
) -> ml_collections.FrozenConfigDict:
    """A resolved `config` with `changes` ({'model.remat': 'dots'}) applied: a new frozen config
    for what is chosen on the device (the remat policy the step is built with), never a change of
    the config a run records."""
    c = editable(config)
    for field, value in changes.items():
        *path, leaf = field.split('.')
        node = c
        for key in path:
            node = node[key]
        node[leaf] = value
    return ml_collections.FrozenConfigDict(c)


def _check_values(
    c: ml_collections.ConfigDict, num_devices: int | None, num_processes: int
) -> None:
    """Rejects settings that cannot work (alone or together) in one ConfigError."""
    problems = []

    def need(ok: bool, field: str, value: Any, expectation: str) -> None:
        if not ok:
            problems.append(f'{field}={value!r} must be {expectation}')

    bs, size, patch = c.batch_size, c.data.image_size, c.mask.patch_size
    devices = num_devices or 1
    need(
        bs > 0 and bs % devices == 0,
        'batch_size',
        bs,
        f'a positive multiple of the {devices} devices' if num_devices else '> 0',
    )
    need(bs % num_processes == 0, 'batch_size', bs, f'divisible over the {num_processes} processes')
    need(
        size > 0 and patch > 0 and size % patch == 0,
        'data.image_size',
        size,
        f'a multiple of mask.patch_size={patch}',
    )
    m = c.model
    need(m.arch in BACKBONES, 'model.arch', m.arch, f'one of {sorted(BACKBONES)}')
    if m.arch in BACKBONES:
        variants = backbone_module(m.arch).VARIANTS
        need(m.variant in variants, 'model.variant', m.variant, f'one of {sorted(variants)}')
    need(m.remat in REMAT_CHOICES, 'model.remat', m.remat, f'one of {REMAT_CHOICES}')
    need(
        m.attention_impl in IMPLEMENTATIONS,
        'model.attention_impl',
        m.attention_impl,
        f'one of {IMPLEMENTATIONS}',
    )
    need(
        m.compute_dtype in COMPUTE_DTYPES,
        'model.compute_dtype',
        m.compute_dtype,
        f'one of {tuple(COMPUTE_DTYPES)}',
    )
    try:
        check_bands_setting(c.data.bands)
    except ValueError as e:
        problems.append(str(e))
    tile = c.data.get('tile_size') or 0
    need(tile >= 0, 'data.tile_size', tile, '0 (whole images) or a tile side in pixels')
    need(
        not 0 < tile < size,
        'data.tile_size',
        tile,
        f'0 or at least the crop data.image_size={size}',
    )
    need(
        0.0 <= c.data.max_nodata <= 1.0,
        'data.max_nodata',
        c.data.max_nodata,
        'a fraction in [0, 1]',
    )
    spec = c.data.get('source')
    if spec:
        try:
            parse_tfds_spec(spec)
        except ValueError as e:
            problems.append(str(e))
        need(not tile, 'data.tile_size', tile, f'0 with data.source={spec!r} (it cuts folders)')
    grid = size // patch if patch > 0 else 0
    if c.loss.use_local:
        need(
            0 < c.loss.num_matches <= grid * grid,
            'loss.num_matches',
            c.loss.num_matches,
            f'in [1, {grid * grid}] for a {grid}x{grid} grid at image_size={size}',
        )
    if c.loss.use_global:
        need(
            c.loss.queue_size >= 2 * bs,
            'loss.queue_size',
            c.loss.queue_size,
            f'at least the {2 * bs} keys a step enqueues (2 x batch_size)',
        )
    if not (c.loss.use_mim or c.loss.use_global or c.loss.use_local):
        problems.append('all of loss.use_mim, loss.use_global and loss.use_local are off')

    o = c.optim
    peak = o.base_lr * bs / 256
    need(_positive(o.base_lr), 'optim.base_lr', o.base_lr, '> 0')
    need(_at_least(o.min_lr, 0), 'optim.min_lr', o.min_lr, '>= 0')
    need(
        not _positive(o.base_lr) or o.min_lr <= peak,
        'optim.min_lr',
        o.min_lr,
        f'<= the peak lr base_lr * batch_size / 256 = {peak:g}',
    )
    need(_at_least(o.weight_decay, 0), 'optim.weight_decay', o.weight_decay, '>= 0')
    need(_at_least(o.warmup_epochs, 0), 'optim.warmup_epochs', o.warmup_epochs, '>= 0')
    need(
        _positive(o.warmup_factor) and o.warmup_factor <= 1,
        'optim.warmup_factor',
        o.warmup_factor,
        'in (0, 1]',
    )
    need(
        _at_least(o.ema_momentum, 0) and o.ema_momentum <= 1,
        'optim.ema_momentum',
        o.ema_momentum,
        'in [0, 1]',
    )

    loss = c.loss
    for name in ('temperature', 'student_temp', 'teacher_temp_warmup', 'teacher_temp'):
        need(_positive(loss[name]), f'loss.{name}', loss[name], '> 0')
    need(
        _at_least(loss.teacher_temp_warmup_epochs, 0),
        'loss.teacher_temp_warmup_epochs',
        loss.teacher_temp_warmup_epochs,
        '>= 0',
    )
    need(
        _at_least(loss.center_momentum, 0) and loss.center_momentum < 1,
        'loss.center_momentum',
        loss.center_momentum,
        'in [0, 1)',
    )
    need(_positive(c.mask.ratio) and c.mask.ratio < 1, 'mask.ratio', c.mask.ratio, 'in (0, 1)')

    if c.total_steps is not None:
        need(c.total_steps >= 0, 'total_steps', c.total_steps, '>= 0 (or None)')
    else:
        need(c.epochs > 0, 'epochs', c.epochs, '> 0 when total_steps is None')
    if c.steps_per_epoch is not None:
        need(c.steps_per_epoch > 0, 'steps_per_epoch', c.steps_per_epoch, '> 0 (or None)')
    for name in ('log_every_steps', 'checkpoint_every_steps'):
        need(c[name] > 0, name, c[name], '> 0')
    need(c.images_every_steps >= 0, 'images_every_steps', c.images_every_steps, '>= 0 (0 = off)')
    need(c.keep_checkpoints >= 1, 'keep_checkpoints', c.keep_checkpoints, '>= 1')
    need(c.max_nonfinite_steps >= 0, 'max_nonfinite_steps', c.max_nonfinite_steps, '>= 0')
    need(c.data.num_workers >= 0, 'data.num_workers', c.data.num_workers, '>= 0')
    if c.eval.path or c.eval.dense_path:
        e = c.eval
        need(e.every_steps > 0, 'eval.every_steps', e.every_steps, '> 0')
        need(e.k >= 1, 'eval.k', e.k, '>= 1')
        need(_positive(e.temperature), 'eval.temperature', e.temperature, '> 0')
        need(
            _positive(e.train_fraction) and e.train_fraction < 1,
            'eval.train_fraction',
            e.train_fraction,
            'in (0, 1)',
        )
        need(e.batch_size > 0, 'eval.batch_size', e.batch_size, '> 0')
    if problems:
        raise ConfigError(
            'Invalid config: ' + '; '.join(problems) + '.',
            'fix the values with --config.FIELD=VALUE',
        )


def _resolve_data(data: ml_collections.ConfigDict, source: Source) -> None:
    """Fills in `data.path`, `data.dtype`, `data.mean` / `data.std` (from `data.stats`) and
    `data.value_range` for `source` in the copy that `resolve` builds, and checks them."""
    if not data.get('source'):
        data.path = data.path or demo_data_path()
    bands = num_bands(data)
    if source.num_bands != bands:  # sources follow data.bands; this guards new sources
        raise DataError(
            f'the data has {source.num_bands} bands, data.bands={data.bands!r} implies {bands}'
        )
    dtype = source.dtype.name
    if data.dtype is not None and data.dtype != dtype:
        raise DataError(f"data.dtype={data.dtype!r}, but the data's pixels are {dtype}")
    data.dtype = dtype
    if data.stats:
        stats = load_stats(data.stats)
        requested = None if data.bands is None else list(data.bands)
        if stats['bands'] != requested or stats['dtype'] != dtype:
            raise DataError(
                f'data.stats={data.stats!r} was computed for bands {stats["bands"]} of '
                f'{stats["dtype"]} pixels, but this run reads bands {requested} of {dtype} pixels; '
                f'recompute it with python -m cmid_jax.tools.data_stats and the same data settings'
            )
        data.mean, data.std = tuple(stats['mean']), tuple(stats['std'])
        if data.value_range is None:
            data.value_range = tuple(stats['value_range'])
    for key in ('mean', 'std'):
        values = tuple(data[key])
        if len(values) != bands:
            raise DataError(
                f'data.{key} has {len(values)} values for {bands} bands (data.bands='
                f'{data.bands!r}); compute per-band values with `python -m cmid_jax.tools.data_stats '
                f'--config=... --out=stats.json` and pass --config.data.stats=stats.json'
            )
    if any(not s > 0 for s in data.std):
        raise DataError(f'data.std={tuple(data.std)!r} must be positive for every band')
    if data.value_range is None:
        data.value_range = (0.0, type_max(dtype))
    black, white = map(float, data.value_range)
    if not 0 <= black < white <= type_max(dtype):
        raise DataError(
            f'data.value_range={tuple(data.value_range)!r} must be (black, white) '
            f'with 0 <= black < white <= {type_max(dtype):g} for {dtype} data'
        )
    data.value_range = (black, white)


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def _at_least(x: float, low: float) -> bool:
    return math.isfinite(x) and x >= low


def resume_changes(
    saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, *, allow: bool
) -> dict[str, tuple[Any, Any]]:
    """{field: (old, new)} between config.json and the resolved config of the resuming run.

    Raises a WorkdirError listing the fields that may not change (see MAY_CHANGE_ON_RESUME),
    unless `allow`; the returned dict holds every change, for the resume history.
    """
    old, new = _flatten(_as_json(saved)), _flatten(_as_json(config))
    changes = {}
    for field in sorted(old.keys() & new.keys()):
        if old[field] != new[field] and not (old[field] is None and field in RESOLVED_AT_START):
            changes[field] = (old[field], new[field])
    blocked = {k: v for k, v in changes.items() if not k.startswith(MAY_CHANGE_ON_RESUME)}
    if blocked and not allow:
        listed = ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in blocked.items())
        raise WorkdirError(
            f'This config differs from the one the workdir was trained with in fields that '
            f'change the train state or its meaning ({listed}); nothing was written',
            'resume with the same settings, use a new --workdir, or pass --allow_config_change '
            'to continue the saved state under the new values',
        )
    return changes


def _as_json(config: ml_collections.ConfigDict) -> dict:
    """The config as config.json holds it (tuples as lists, ...), so both sides compare alike."""
    return json.loads(config.to_json_best_effort())


def _flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out
