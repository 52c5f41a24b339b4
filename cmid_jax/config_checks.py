"""Config checks that run before anything is compiled or written.

`check_config` rejects values that cannot work (alone or together); `resume_changes` compares the
config of a resumed run with the workdir's config.json and stops on a change that would mix two
different runs in one state.
"""

from __future__ import annotations

import json
import math
from typing import Any

import ml_collections

from cmid_jax.errors import ConfigError, WorkdirError

# Fields a resumed run may change: run length, logging and evaluation cadence, checkpoint
# retention, host-side workers, the data location (its kind is still checked through bands,
# dtype, mean/std and steps_per_epoch) and the attention kernel (the same computation on
# another device). Every other field changes the state's structure or meaning.
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
)
# Fields the run fills in from the data when the config leaves them None; a None in config.json
# (e.g. written by cmid-import-torch) is not a change.
RESOLVED_AT_START = ('data.dtype', 'data.value_range', 'steps_per_epoch')


def check_config(config: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> None:
    """Fails fast, before anything is compiled, on settings that cannot work (alone or together).

    Raises one ConfigError listing every problem, each naming the field, its value and what it
    must be.
    """
    problems = []

    def need(ok: bool, field: str, value: Any, expectation: str) -> None:
        if not ok:
            problems.append(f'{field}={value!r} must be {expectation}')

    c = config
    bs, size, patch = c.batch_size, c.data.image_size, c.mask.patch_size
    need(
        bs > 0 and bs % num_devices == 0,
        'batch_size',
        bs,
        f'a positive multiple of the {num_devices} devices',
    )
    need(bs % num_processes == 0, 'batch_size', bs, f'divisible over the {num_processes} processes')
    need(size % patch == 0, 'data.image_size', size, f'a multiple of mask.patch_size={patch}')
    grid = size // patch
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
