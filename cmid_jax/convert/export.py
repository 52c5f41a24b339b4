"""Exports the backbone of a cmid_jax checkpoint as a PyTorch state_dict plus JSON metadata.

    python -m cmid_jax.tools.export --workdir=runs/r50 --out=r50_cmid.pth
    python -m cmid_jax.tools.export --workdir=runs/vitb --step=2000 --which=teacher --out=vit.safetensors

The weights go to `--out` (`.pth`/`.pt`: `torch.save`, needs PyTorch; `.safetensors`: needs only
the `safetensors` package) and everything needed to rebuild and feed the model to `OUT.json`:
the PyTorch constructor (timm or torchvision name or class and its kwargs, strict-loadable; for
ResNets also the torchvision alternative, which misses only `fc.*`; None for the CPU-smoke ResNet
'nano', whose 16-channel stem no torch library builds), the input size, band names,
the per-band mean/std of `(pixels / 255 - mean) / std`, the step, which network, the workdir's
name and the resolved config (its data and evaluation paths, like the workdir, as their last
component only: no path of the exporting machine goes into the file). The default is the student backbone of the latest step, the network the official CMID
release deploys (cmid-method.md 10.1). `load_torch_model(OUT.json)` rebuilds the PyTorch module.

The tensors and the PyTorch constructors come from the backbone's own module (`to_torch_state_dict`,
`torch_models`), looked up in the registry `cmid_jax.models.BACKBONES`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from cmid_jax.convert import require_torch
from cmid_jax.data.bands import num_bands, type_max
from cmid_jax.models import backbone_module
from cmid_jax.models.cmid import STATE_KEYS, backbone_variables
from cmid_jax.restore import restore_train_state
from cmid_jax.workdir import Workdir

FORMAT = 'cmid_jax.backbone/1'
WEIGHT_SUFFIXES = {'.pth': 'pth', '.pt': 'pth', '.safetensors': 'safetensors'}
RGB_BANDS = ('red', 'green', 'blue')  # data.bands=None: 8-bit RGB


def weights_format(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f'{path!r}: the output must end in one of {sorted(WEIGHT_SUFFIXES)}')
    return WEIGHT_SUFFIXES[suffix]


def save_weights(
    state_dict: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None
) -> None:
    """Writes a numpy state_dict as `.pth` (torch.save) or `.safetensors` (no torch needed).

    Both go through Python's `open`, so the file gets the usual mode (0644 under umask 022):
    safetensors' own `save_file` creates it readable by its owner only.
    """
    fmt = weights_format(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    if fmt == 'safetensors':
        from safetensors.numpy import save  # pylint: disable=import-outside-toplevel

        # 'format': 'pt' lets safetensors.torch / transformers treat it as a torch state_dict.
        payload = save(arrays, metadata={'format': 'pt', **(metadata or {})})
        with open(path, 'wb') as f:
            f.write(payload)
    else:
        torch = require_torch('writing or reading a .pth file')
        with open(path, 'wb') as f:
            torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, f)


def backbone_state_dict(
    state: Mapping[str, Any], arch: str, which: str = 'student', layout: str | None = None
) -> dict[str, np.ndarray]:
    """The student's or teacher's backbone of a train state as a PyTorch state_dict (numpy), in
    `layout` (default: the arch's export layout)."""
    module = backbone_module(arch)
    return module.to_torch_state_dict(
        backbone_variables(state, which), layout=layout or module.EXPORT_LAYOUT
    )


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


# Config fields that name files of the exporting machine: the metadata, a file meant to be shared,
# keeps their last path component only, as it does for the workdir.
_PATH_FIELDS = (('data', 'path'), ('data', 'stats'), ('eval', 'path'), ('eval', 'dense_path'))


def _name(path: str | None) -> str | None:
    """The last component of a local or remote path (`runs/vitb/` -> `vitb`)."""
    return os.path.basename(os.path.normpath(path)) if path else path


def _shareable_config(config: dict[str, Any]) -> dict[str, Any]:
    for section, field in _PATH_FIELDS:
        if isinstance(config.get(section), dict) and field in config[section]:
            config[section][field] = _name(config[section][field])
    return config


def export_backbone(
    workdir: str,
    out: str,
    step: int | None = None,
    which: str = 'student',
    layout: str | None = None,
) -> dict[str, Any]:
    """Writes a checkpoint's backbone to `out` and its metadata to `out + '.json'`.

    Args:
      workdir: a cmid_jax workdir (from `cmid_jax.main` or `cmid_jax.convert.import_torch`).
      out: `.pth`/`.pt` (needs PyTorch) or `.safetensors` (needs only safetensors).
      step: checkpoint step; the latest by default.
      which: 'student' (the deployed network, default) or 'teacher' (the EMA network).
      layout: a key layout of the arch (`LAYOUTS` of its module; default its `EXPORT_LAYOUT`):
        for Swin 'timm' (default) or 'mmcls' (the official CMID / mmseg keys).

    Returns the metadata dict that was written.
    """
    fmt = weights_format(out)  # Fail on bad arguments before restoring anything.
    if which not in STATE_KEYS:
        raise ValueError(f'which must be one of {sorted(STATE_KEYS)}, got {which!r}')
    if fmt == 'pth':
        require_torch('writing or reading a .pth file')
    config, state, step = restore_train_state(workdir, step)
    arch, variant, size = config.model.arch, config.model.variant, config.data.image_size
    in_chans = num_bands(config.data)
    models = backbone_module(arch).torch_models(
        variant, img_size=size, in_chans=in_chans, layout=layout
    )
    if not models:
        logging.warning(
            'No timm/torchvision model has the widths of %s %r; the weights keep the '
            'key layout of the larger variants.',
            arch,
            variant,
        )
    state_dict = backbone_state_dict(state, arch, which, layout)

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_weights(
        state_dict, out, {'arch': arch, 'variant': variant, 'which': which, 'step': str(step)}
    )
    bands = config.data.get('bands')
    scale = type_max(config.data.get('dtype') or 'uint8')  # configs from before bands: 8-bit
    metadata = {
        'format': FORMAT,
        'weights': os.path.basename(out),
        'weights_format': fmt,
        'weights_sha256': _sha256(out),
        'num_tensors': len(state_dict),
        'torch_model': models[0] if models else None,  # None: no PyTorch counterpart
        'torch_model_alternatives': models[1:],
        'input': {
            'size': [size, size],
            'layout': 'NCHW',
            'channels': in_chans,
            # Names or 0-based indices into the source files' bands, as configured.
            'bands': list(RGB_BANDS if bands is None else bands),
            'pixel_dtype': config.data.get('dtype') or 'uint8',
            'mean': list(config.data.mean),
            'std': list(config.data.std),
            'normalisation': f'x = (pixels / {scale:g} - mean) / std, per band',
        },
        'arch': arch,
        'variant': variant,
        'which': which,
        'step': int(step),
        'workdir': _name(str(Workdir(workdir))),
        'config': _shareable_config(json.loads(config.to_json_best_effort())),
    }
    with open(out + '.json', 'w', encoding='utf-8') as f:
        json.dump(metadata, f, indent=2)
    logging.info(
        'Wrote the %s backbone of step %d (%s %s, %d tensors) to %s and %s.json',
        which,
        step,
        arch,
        variant,
        len(state_dict),
        out,
        out,
    )
    return metadata


# --- Reading an export back (needs PyTorch) ---------------------------------------------------


def _import_object(dotted: str) -> Any:
    module, _, name = dotted.rpartition('.')
    return getattr(importlib.import_module(module), name)


def build_torch_model(spec: Mapping[str, Any]) -> Any:
    """The (randomly initialised) PyTorch module one `torch_model` metadata entry describes."""
    kwargs = dict(spec['kwargs'])
    kwargs.update({k: _import_object(v) for k, v in spec.get('object_kwargs', {}).items()})
    if spec.get('model_name'):
        if spec['library'] == 'timm':
            return importlib.import_module('timm').create_model(spec['model_name'], **kwargs)
        if spec['library'] == 'torchvision':
            return importlib.import_module('torchvision.models').get_model(
                spec['model_name'], **kwargs
            )
        raise ValueError(f'no builder for library {spec["library"]!r} by model name')
    return _import_object(spec['class'])(**kwargs)


def read_weights(path: str) -> dict[str, Any]:
    """An exported state_dict as torch tensors."""
    if weights_format(path) == 'safetensors':
        require_torch('writing or reading a .pth file')
        from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel

        return load_file(path)
    return require_torch('writing or reading a .pth file').load(
        path, map_location='cpu', weights_only=True
    )


def load_torch_model(metadata_path: str, alternative: int | None = None) -> Any:
    """Builds the exported backbone in PyTorch and loads its weights, in eval mode.

    `alternative` picks an entry of `torch_model_alternatives` (e.g. 0 = torchvision for a
    ResNet) instead of the primary `torch_model`. Fails unless exactly the keys the metadata
    announces as missing (`fc.*` for torchvision) are missing and none is unexpected.
    """
    with open(metadata_path, encoding='utf-8') as f:
        meta = json.load(f)
    spec = (
        meta['torch_model']
        if alternative is None
        else (meta['torch_model_alternatives'][alternative])
    )
    if spec is None:
        raise ValueError(
            f'{metadata_path}: {meta["arch"]} {meta["variant"]!r} has no PyTorch model to load into'
        )
    model = build_torch_model(spec)
    weights = os.path.join(os.path.dirname(os.path.abspath(metadata_path)), meta['weights'])
    missing, unexpected = model.load_state_dict(read_weights(weights), strict=False)
    if unexpected or sorted(missing) != sorted(spec.get('missing_keys', [])):
        raise ValueError(
            f'{weights} does not load into {spec}: missing {missing}, unexpected {unexpected}'
        )
    return model.eval()
