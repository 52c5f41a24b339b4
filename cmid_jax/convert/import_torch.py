"""Imports an official CMID PyTorch checkpoint into a cmid_jax workdir.

    python -m cmid_jax.tools.import_torch --checkpoint=CMID_R50_200ep.pth \
        --config=configs/resnet50.py --workdir=runs/r50_continued
    python -m cmid_jax.main --config=configs/resnet50.py --workdir=runs/r50_continued

Two kinds of file are understood (`.pth`/`.pt` via torch, or `.safetensors`):

* the full trainer checkpoint, a dict whose `model` entry holds the official `PretrainModel`
  state_dict (student and teacher backbones, mask token, MIM decoder, projectors, local heads,
  centre, queue; cmid-method.md 10.2). Every part of the train state it determines is imported;
* a backbone-only state_dict: `extract.py`'s output (the student backbone, prefix stripped), or a
  plain timm / torchvision state_dict whose classifier (`fc.*`, `head.*`) is dropped with a note.
  It initialises the student *and* the teacher backbone; the heads, decoder, mask token, queue and
  centre start fresh, exactly as a new run with this config (seed `config.seed`) would.

In both cases the optimizer starts fresh (the official Adan state is not converted: its decay is
prox-style and its layout is torch's) and the step starts at 0, so continued pretraining runs its
own schedule (lr warm-up and cosine, EMA momentum, teacher temperature) from the config. The grain
iterator starts afresh too (the checkpoint holds no `data` item). Resume with `cmid_jax.main` and
the same config and overrides (the head widths and queue size must match the imported state).

Everything is checked against the config before anything is written: an architecture or width
mismatch raises one ValueError that lists every unknown key, missing key and shape mismatch, and
leaves the workdir untouched. A workdir that already holds checkpoints is refused unless
`--overwrite`, which deletes them.

`torch.load` runs with `weights_only=True`. The official trainer checkpoint also pickles training
objects (its metric storage), which that refuses; such a file is then read with the restricted
unpickler of `cmid_jax.convert.safe_unpickle`, which rebuilds tensors and plain containers and
replaces every other pickled class or function by an inert placeholder, so no code from the file
ever runs; it must then be a trainer checkpoint (a `model` entry of tensors).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from cmid_jax import optim
from cmid_jax.config_resolve import resolve
from cmid_jax.convert import official, require_torch, safe_unpickle
from cmid_jax.convert.adapt import adapt_stem
from cmid_jax.errors import ConfigError, DataError, WorkdirError
from cmid_jax.models import BACKBONES, backbone_module
from cmid_jax.models.cmid import STATE_KEYS
from cmid_jax.state_dict import as_numpy
from cmid_jax.step import TrainStep
from cmid_jax.workdir import IMPORT, Workdir

# A state_dict saved from a DistributedDataParallel wrapper has every key under this prefix.
_DDP_PREFIX = 'module.'
# Classifier heads of plain timm / torchvision state_dicts; not part of a backbone.
_CLASSIFIER_PREFIXES = ('fc.', 'head.')


def _torch_load(path: str) -> tuple[Any, bool]:
    """`torch.load` with weights_only=True, else with the restricted unpickler; returns
    (object, whether the restricted unpickler replaced pickled objects)."""
    torch = require_torch('reading a .pth checkpoint')
    try:
        return torch.load(path, map_location='cpu', weights_only=True), False
    except pickle.UnpicklingError:
        pass
    obj, replaced = safe_unpickle.load(path)
    logging.warning(
        '%s pickles objects besides tensors (%s); they were read as inert '
        'placeholders: none of their code ran.',
        path,
        ', '.join(replaced),
    )
    return obj, True


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reads a checkpoint file into (numpy state_dict, info about the file).

    Unwraps `ckpt['model']` (official trainer checkpoint) or `ckpt['state_dict']`; `info` holds
    `trainer_checkpoint` and, when present, the trainer `epoch`.
    """
    if not os.path.isfile(path):
        raise DataError(f'checkpoint {path!r} not found')
    unpickled = False
    if path.endswith('.safetensors'):
        from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

        obj = load_file(path)
    else:
        obj, unpickled = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise DataError(f'{path}: expected a state_dict or a checkpoint dict, got {type(obj)}')
    info: dict[str, Any] = {'trainer_checkpoint': isinstance(obj.get('model'), Mapping)}
    if info['trainer_checkpoint']:
        if 'epoch' in obj:
            info['epoch'] = int(obj['epoch'])
        obj = obj['model']
    elif isinstance(obj.get('state_dict'), Mapping):
        obj = obj['state_dict']
    if unpickled and not info['trainer_checkpoint']:
        raise DataError(
            f'{path} pickles objects besides tensors but is not a CMID trainer '
            "checkpoint (no 'model' entry); refusing it"
        )
    not_tensors = sorted(k for k, v in obj.items() if not hasattr(v, 'shape'))
    if not_tensors:
        raise DataError(f'{path}: entries that are not tensors: {not_tensors}')
    return {k: as_numpy(v) for k, v in _strip_common_prefix(obj, _DDP_PREFIX).items()}, info


def _strip_common_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def backbone_only(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A backbone-only state_dict without its `online_encoder.model.` prefix (if it has one) and
    without a classifier; returns it and the dropped classifier keys."""
    sd = _strip_common_prefix(state_dict, official.BACKBONE_PREFIXES['student'])
    dropped = sorted(k for k in sd if k.startswith(_CLASSIFIER_PREFIXES))
    if dropped:
        logging.info('Dropping the classifier of a plain timm/torchvision state_dict: %s', dropped)
    return {k: v for k, v in sd.items() if k not in dropped}, dropped


def _guess_arch(keys) -> str | None:
    stripped = {k.split(official.BACKBONE_PREFIXES['student'], 1)[-1] for k in keys}
    for arch, module in BACKBONES.items():
        if stripped & set(module.TELL_KEYS):
            return arch
    return None


def _mismatch_header(config: ml_collections.ConfigDict, keys, kind: str) -> str:
    m = config.model
    lines = [
        f'{kind} checkpoint does not match config.model.arch={m.arch!r} '
        f'variant={m.variant!r} (data.image_size={config.data.image_size}).'
    ]
    guess = _guess_arch(keys)
    if guess is not None and guess != m.arch:
        lines.append(f'Its backbone looks like a {guess!r} backbone: pass a config for that arch.')
    if kind == 'full':
        lines.append(
            f'Head widths come from config.model (proj_hidden_dim={m.proj_hidden_dim}, '
            f'proj_dim={m.proj_dim}, local_hidden_dim={m.local_hidden_dim}, '
            f'local_bottleneck_dim={m.local_bottleneck_dim}, '
            f'local_prototypes={m.local_prototypes}, local_use_bn={m.local_use_bn}) '
            f'and config.loss.queue_size={config.loss.queue_size}.'
        )
    return '\n'.join(lines)


def _check_like(state: dict, abstract: dict) -> None:
    """The imported state must have exactly the shapes and dtypes `main` restores into."""
    spec = lambda tree: {
        jax.tree_util.keystr(p): (tuple(x.shape), np.dtype(x.dtype))
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }
    got, want = spec(state), spec(abstract)
    if got != want:
        diff = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
        raise AssertionError(
            f'imported state differs from TrainStep.abstract_state at {diff[:20]}: '
            f'{[(got.get(k), want.get(k)) for k in diff[:20]]}'
        )


def import_checkpoint(
    checkpoint: str, config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False
) -> dict[str, Any]:
    """Turns an official CMID checkpoint into a cmid_jax workdir at step 0.

    Args:
      checkpoint: full trainer checkpoint or backbone-only file (`.pth`, `.pt`, `.safetensors`).
      config: the cmid_jax config to continue with; it must describe the checkpoint's network.
      workdir: target; receives `ckpt/0/state`, `config.json` and `import.json`.
      overwrite: delete checkpoints already in `workdir` instead of refusing.

    Returns the import record (also written to `workdir/import.json`). Raises ValueError, with
    nothing written, when the checkpoint does not match the config.
    """
    wd = Workdir(workdir)
    if wd.has_checkpoints() and not overwrite:
        raise WorkdirError(
            f'{workdir} already has checkpoints; pass overwrite=True (--overwrite) to replace them'
        )
    state_dict, info = read_checkpoint(checkpoint)
    config = resolve(config)
    # Shapes do not depend on the schedule, which `main` sets up again when it resumes.
    trainer = TrainStep.create(
        config, optim.Schedule(config.total_steps or 1, config.steps_per_epoch or 1)
    )
    arch = config.model.arch
    full = official.is_full_checkpoint(state_dict)
    kind = 'full' if full else 'backbone'
    dropped: list[str] = []
    parts: dict[str, Any] = {}  # train-state entries the checkpoint determines

    # --- Validate and convert (nothing is written before this succeeds) ---------------------
    try:
        if full:
            parts = official.from_official_state_dict(
                state_dict,
                arch=arch,
                backbone=trainer.nets.backbone,
                template=trainer.abstract_state,
            )
        else:
            state_dict, dropped = backbone_only(state_dict)
            variables = backbone_module(arch).from_torch_state_dict(
                state_dict, trainer.nets.backbone
            )
    except ValueError as err:
        raise ConfigError(
            f'{checkpoint}: {_mismatch_header(config, state_dict, kind)}\n{err}'
        ) from None

    # Whatever the checkpoint does not determine starts as in a fresh run with this config; jit
    # drops the unused parts of the init (e.g. the backbone, for a full checkpoint).
    fresh = jax.jit(
        lambda key: {k: v for k, v in trainer.init_state(key).items() if k not in parts}
    )
    state = dict(jax.device_get(fresh(jax.random.key(config.seed))), **parts)
    if not full:
        for which in STATE_KEYS.values():
            for coll, value in zip(which, (variables['params'], variables.get('batch_stats', {}))):
                state[coll] = dict(state[coll], backbone=value)
    if trainer.nets.in_chans != 3:  # RGB weights into an N-band model: timm's stem rule.
        for coll in ('params', 'teacher_params'):
            state[coll] = dict(
                state[coll], backbone=adapt_stem(state[coll]['backbone'], trainer.nets.in_chans)
            )
    # Fresh optimizer and step 0: continued pretraining runs its own schedule.
    state['step'] = np.zeros((), np.int32)
    state['opt_state'] = jax.device_get(jax.jit(trainer.tx.init)(state['params']))
    _check_like(state, trainer.abstract_state)

    # --- Write -----------------------------------------------------------------------------
    record = {
        'checkpoint': os.path.abspath(checkpoint),
        'kind': kind,
        'source_epoch': info.get('epoch'),
        'dropped_keys': dropped,
        'step': 0,
        'notes': [
            'optimizer state starts fresh (the official Adan state is not converted)',
            'step starts at 0: the lr, EMA and teacher-temperature schedules restart',
            'the data iterator starts fresh',
        ]
        + (
            []
            if full
            else [
                'heads, decoder, mask token, queue and centre are freshly '
                'initialised; student and teacher backbones both come '
                'from the file'
            ]
        ),
    }
    if overwrite:
        wd.remove_checkpoints()
    wd.make()
    checkpoints = wd.checkpoints()
    checkpoints.save(0, state, force=True)  # No data item: the iterator starts afresh.
    checkpoints.close()
    wd.write_config(config)
    wd.write_json(IMPORT, record)
    logging.info(
        'Imported the %s checkpoint %s into %s at step 0 (%s).',
        kind,
        checkpoint,
        workdir,
        '; '.join(record['notes']),
    )
    return record
