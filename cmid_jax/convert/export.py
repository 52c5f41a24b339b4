"""Exports the backbone of a cmid_jax checkpoint as a PyTorch state_dict plus JSON metadata.

    python -m cmid_jax.tools.export --workdir=runs/r50 --out=r50_cmid.pth
    python -m cmid_jax.tools.export --workdir=runs/vitb --step=2000 --which=teacher --out=vit.safetensors

The weights go to `--out` (`.pth`/`.pt`: `torch.save`, needs PyTorch; `.safetensors`: needs only
the `safetensors` package) and everything needed to rebuild and feed the model to `OUT.json`:
the PyTorch constructor (timm or torchvision name or class and its kwargs, strict-loadable; for
ResNets also the torchvision alternative, which misses only `fc.*`; None for the CPU-smoke ResNet
'nano', whose 16-channel stem no torch library builds), the input size, band names,
the per-band mean/std of `(pixels / 255 - mean) / std`, the step, which network and the resolved
config. The default is the student backbone of the latest step, the network the official CMID
release deploys (cmid-method.md 10.1). `load_torch_model(OUT.json)` rebuilds the PyTorch module.

Each arch is one entry of `TORCH_MODELS`; the tensors come from the backbone module's own
`to_torch_state_dict`, looked up through `cmid_jax.convert.official.BACKBONES`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from typing import Any, Callable, Mapping

from absl import logging
import numpy as np

from cmid_jax.restore import restore_train_state
from cmid_jax.workdir import Workdir
from cmid_jax.data.bands import num_bands, type_max
from cmid_jax.convert import official
from cmid_jax.models import TORCH_NAMES, resnet, swin, vit

FORMAT = 'cmid_jax.backbone/1'
WEIGHT_SUFFIXES = {'.pth': 'pth', '.pt': 'pth', '.safetensors': 'safetensors'}
RGB_BANDS = ('red', 'green', 'blue')  # data.bands=None: 8-bit RGB


def _spec(library: str, *, kwargs: dict[str, Any], features: str, model_name: str | None = None,
          cls: str | None = None, object_kwargs: dict[str, str] | None = None,
          **extra: Any) -> dict[str, Any]:
    """One PyTorch constructor: `library` + registered `model_name`, or a `class` path, with
    JSON kwargs; `object_kwargs` are kwargs whose values are classes named by dotted path."""
    spec = {'library': library}
    spec.update({'model_name': model_name} if model_name else {'class': cls})
    spec['kwargs'] = kwargs
    if object_kwargs:
        spec['object_kwargs'] = object_kwargs
    return dict(spec, features=features, **extra)


def _resnet_models(variant: str, *, img_size: int, in_chans: int,
                   layout: str | None) -> list[dict[str, Any]]:
    del img_size  # any multiple of 32
    _no_layout_choice('resnet', layout)
    stage_sizes, width = resnet.VARIANTS[variant]
    if width != 64:  # timm and torchvision both fix the stem at 64 channels
        return []
    name = TORCH_NAMES.get(('resnet', variant))
    features = 'model.forward_features(x): (B, C, H/32, W/32), the layer4 map'
    # torchvision always builds the classifier: load with strict=False (or set fc=Identity).
    tv = dict(features='conv1, bn1, relu, maxpool, layer1..layer4: (B, C, H/32, W/32)',
              missing_keys=['fc.bias', 'fc.weight'])
    layers = list(stage_sizes)
    if name:
        models = [_spec('timm', model_name=name, kwargs=dict(in_chans=in_chans, num_classes=0),
                        features=features),
                  _spec('torchvision', model_name=name, kwargs={}, **tv)]
    else:
        models = [_spec('timm', cls='timm.models.resnet.ResNet',
                        object_kwargs=dict(block='timm.models.resnet.Bottleneck'),
                        kwargs=dict(layers=layers, in_chans=in_chans, num_classes=0),
                        features=features),
                  _spec('torchvision', cls='torchvision.models.resnet.ResNet',
                        object_kwargs=dict(block='torchvision.models.resnet.Bottleneck'),
                        kwargs=dict(layers=layers), **tv)]
    return models if in_chans == 3 else models[:1]  # torchvision ResNets take 3 bands only


def _vit_models(variant: str, *, img_size: int, in_chans: int,
                layout: str | None) -> list[dict[str, Any]]:
    _no_layout_choice('vit', layout)
    name = TORCH_NAMES.get(('vit', variant))
    v = vit.VARIANTS[variant]
    features = ('model.forward_features(x)[:, model.num_prefix_tokens:]: (B, N, D) patch tokens '
                'after the final norm (cmid_jax drops the cls token)')
    if name:
        return [_spec('timm', model_name=name, features=features,
                      kwargs=dict(img_size=img_size, in_chans=in_chans, num_classes=0))]
    return [_spec('timm', cls='timm.models.vision_transformer.VisionTransformer',
                  features=features,
                  kwargs=dict(img_size=img_size, patch_size=v['patch_size'],
                              embed_dim=v['embed_dim'], depth=v['depth'],
                              num_heads=v['num_heads'], in_chans=in_chans, num_classes=0))]


def _swin_models(variant: str, *, img_size: int, in_chans: int,
                 layout: str | None) -> list[dict[str, Any]]:
    v = swin.VARIANTS[variant]
    shape = dict(embed_dim=v['embed_dim'], depths=list(v['depths']),
                 num_heads=list(v['num_heads']), window_size=v['window_size'])
    if layout in (None, 'timm'):
        name = TORCH_NAMES.get(('swin', variant))
        features = 'model.forward_features(x): (B, H/32, W/32, C) after the final norm'
        if name:
            return [_spec('timm', model_name=name, features=features,
                          kwargs=dict(img_size=img_size, in_chans=in_chans, num_classes=0))]
        return [_spec('timm', cls='timm.models.swin_transformer.SwinTransformer',
                      features=features,
                      kwargs=dict(img_size=img_size, patch_size=4, **shape, in_chans=in_chans,
                                  num_classes=0))]
    # The official CMID (mmcls) layout is what mmseg / mmdet read; not loaded by our tests.
    return [_spec('mmseg', cls='mmseg.models.backbones.SwinTransformer',
                  kwargs=dict(pretrain_img_size=img_size, in_channels=in_chans,
                              embed_dims=shape['embed_dim'], depths=shape['depths'], num_heads=shape['num_heads'],
                              window_size=shape['window_size'], patch_size=4, out_indices=[3]),
                  features='out_indices=(3,): the norm3 map, (B, C, H/32, W/32)',
                  note='mmseg / mmdet load it through init_cfg=dict(type="Pretrained", '
                       'checkpoint=...), non-strictly (cmid-method.md 10.4)')]


def _no_layout_choice(arch: str, layout: str | None) -> None:
    if layout is not None:
        raise ValueError(f'layout={layout!r} is only a choice for Swin, not {arch!r}')


# arch -> f(variant, *, img_size, in_chans, layout) -> PyTorch constructors, the strict-loadable
# one first; [] when no torch library builds that variant.
TORCH_MODELS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    'resnet': _resnet_models,
    'vit': _vit_models,
    'swin': _swin_models,
}
# Extra `to_torch_state_dict` arguments per arch and layout (Swin writes mmcls or timm keys).
_CONVERT_KWARGS: dict[str, Callable[[str | None], dict[str, Any]]] = {
    'swin': lambda layout: {'layout': layout or 'timm'},
}


def weights_format(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f'{path!r}: the output must end in one of {sorted(WEIGHT_SUFFIXES)}')
    return WEIGHT_SUFFIXES[suffix]


def _import_torch():
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise ImportError('writing or reading a .pth file needs PyTorch (pip install torch); a '
                          '.safetensors file needs only the safetensors package') from err
    return torch


def save_weights(state_dict: Mapping[str, np.ndarray], path: str,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Writes a numpy state_dict as `.pth` (torch.save) or `.safetensors` (no torch needed)."""
    fmt = weights_format(path)
    if fmt == 'safetensors':
        from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
        # 'format': 'pt' lets safetensors.torch / transformers treat it as a torch state_dict.
        save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path,
                  metadata={'format': 'pt', **(metadata or {})})
    else:
        torch = _import_torch()
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()},
                   path)


def backbone_state_dict(state: Mapping[str, Any], arch: str, which: str = 'student',
                        layout: str | None = None) -> dict[str, np.ndarray]:
    """The student's or teacher's backbone of a train state as a PyTorch state_dict (numpy)."""
    kwargs = _CONVERT_KWARGS[arch](layout) if arch in _CONVERT_KWARGS else {}
    module = official.backbone_format(arch).module
    return module.to_torch_state_dict(official.backbone_variables(state, which), **kwargs)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def export_backbone(workdir: str, out: str, step: int | None = None, which: str = 'student',
                    layout: str | None = None) -> dict[str, Any]:
    """Writes a checkpoint's backbone to `out` and its metadata to `out + '.json'`.

    Args:
      workdir: a cmid_jax workdir (from `cmid_jax.main` or `cmid_jax.convert.import_torch`).
      out: `.pth`/`.pt` (needs PyTorch) or `.safetensors` (needs only safetensors).
      step: checkpoint step; the latest by default.
      which: 'student' (the deployed network, default) or 'teacher' (the EMA network).
      layout: Swin only: 'timm' (default) or 'mmcls' (the official CMID / mmseg keys).

    Returns the metadata dict that was written.
    """
    fmt = weights_format(out)  # Fail on bad arguments before restoring anything.
    if which not in official.STATE_KEYS:
        raise ValueError(f'which must be one of {sorted(official.STATE_KEYS)}, got {which!r}')
    if fmt == 'pth':
        _import_torch()
    config, state, step = restore_train_state(workdir, step)
    arch, variant, size = config.model.arch, config.model.variant, config.data.image_size
    if arch not in TORCH_MODELS:
        raise ValueError(f'no PyTorch export for arch {arch!r}; known: {sorted(TORCH_MODELS)}')
    in_chans = num_bands(config.data)
    models = TORCH_MODELS[arch](variant, img_size=size, in_chans=in_chans, layout=layout)
    if not models:
        logging.warning('No timm/torchvision model has the widths of %s %r; the weights keep the '
                        'key layout of the larger variants.', arch, variant)
    state_dict = backbone_state_dict(state, arch, which, layout)

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_weights(state_dict, out, {'arch': arch, 'variant': variant, 'which': which,
                                   'step': str(step)})
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
        'workdir': str(Workdir(workdir)),
        'config': json.loads(config.to_json_best_effort()),
    }
    with open(out + '.json', 'w', encoding='utf-8') as f:
        json.dump(metadata, f, indent=2)
    logging.info('Wrote the %s backbone of step %d (%s %s, %d tensors) to %s and %s.json',
                 which, step, arch, variant, len(state_dict), out, out)
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
                spec['model_name'], **kwargs)
        raise ValueError(f"no builder for library {spec['library']!r} by model name")
    return _import_object(spec['class'])(**kwargs)


def read_weights(path: str) -> dict[str, Any]:
    """An exported state_dict as torch tensors."""
    if weights_format(path) == 'safetensors':
        _import_torch()
        from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
        return load_file(path)
    return _import_torch().load(path, map_location='cpu', weights_only=True)


def load_torch_model(metadata_path: str, alternative: int | None = None) -> Any:
    """Builds the exported backbone in PyTorch and loads its weights, in eval mode.

    `alternative` picks an entry of `torch_model_alternatives` (e.g. 0 = torchvision for a
    ResNet) instead of the primary `torch_model`. Fails unless exactly the keys the metadata
    announces as missing (`fc.*` for torchvision) are missing and none is unexpected.
    """
    with open(metadata_path, encoding='utf-8') as f:
        meta = json.load(f)
    spec = meta['torch_model'] if alternative is None else (
        meta['torch_model_alternatives'][alternative])
    if spec is None:
        raise ValueError(f"{metadata_path}: {meta['arch']} {meta['variant']!r} has no PyTorch "
                         'model to load into')
    model = build_torch_model(spec)
    weights = os.path.join(os.path.dirname(os.path.abspath(metadata_path)), meta['weights'])
    missing, unexpected = model.load_state_dict(read_weights(weights), strict=False)
    if unexpected or sorted(missing) != sorted(spec.get('missing_keys', [])):
        raise ValueError(f'{weights} does not load into {spec}: missing {missing}, '
                         f'unexpected {unexpected}')
    return model.eval()
