"""The official CMID full-checkpoint layout (`ckpt['model']`), both ways.

`to_official_state_dict(state, arch=)` turns a cmid_jax train state into the PyTorch state_dict
that the official `PretrainModel` (MoCo variant) holds, and `from_official_state_dict` turns such a
state_dict back into the parts of a train state, checking every key and shape first
(cmid-method.md section 10.2):

  online_encoder.model.<backbone>  student backbone      branch_encoder.<backbone>  teacher
  online_encoder.mask_token        (1,C,1,1) CNN, (1,1,C) token backbones (Swin; also our ViT)
  mim2org.decoder_pred.0.*         1x1 Conv2d, weight (s*s*3, C, 1, 1)
  {online,branch}_projector.layer.0.{0,3}.*            Linear
  {class,branch_class}_projector.mlp.{0,3,6}.*         Conv1d k=1, BatchNorm1d at mlp.{1,4}
                                 .mlp.{0,2,4}.*        without BN (Swin, ViT)
  {class,branch_class}_projector.last_layer.weight_{g,v}   weight norm, g == 1
  class_loss.center (1,P,1)        queue (D,K), one key per column     queue_ptr (1,) int64

Backbones convert through their own module (`to_torch_state_dict` / `from_torch_state_dict` in
the official layout, `MASK_TOKEN_LAYOUT`), looked up in the registry `cmid_jax.models.BACKBONES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from cmid_jax.errors import ConfigError
from cmid_jax.models import backbone_module
from cmid_jax.models.cmid import STATE_KEYS, backbone_variables
from cmid_jax.state_dict import match_state_dict

Codec = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


# Official state_dict prefix of each backbone (extract.py strips the student's).
BACKBONE_PREFIXES = {'student': 'online_encoder.model.', 'teacher': 'branch_encoder.'}
# Top-level names that only a full trainer checkpoint's `model` state_dict has.
FULL_CHECKPOINT_MARKERS = (
    'online_encoder.',
    'branch_encoder.',
    'online_projector.',
    'branch_projector.',
    'class_projector.',
    'branch_class_projector.',
    'mim2org.',
    'class_loss.',
)

# (cmid_jax -> official, official -> cmid_jax). Only `.T`, indexing and reshapes, so each is exact.
_SAME: Codec = (lambda x: x, lambda x: x)
_LINEAR: Codec = (lambda k: k.T, lambda w: w.T)  # Dense (in, out) <-> Linear (out, in)
_CONV1D: Codec = (lambda k: k.T[..., None], lambda w: w[..., 0].T)  # (in, out) <-> (out, in, 1)
_CONV2D_1X1: Codec = (lambda k: k.T[..., None, None], lambda w: w[..., 0, 0].T)
_CENTER: Codec = (lambda c: c.reshape(1, -1, 1), lambda c: c.reshape(-1))
_QUEUE_PTR: Codec = (lambda p: p.reshape(1).astype(np.int64), lambda p: p.reshape(()))
_MASK_TOKEN: dict[str, Codec] = {
    'nchw': (lambda t: t.reshape(1, -1, 1, 1), lambda t: t.reshape(-1)),
    'nlc': (lambda t: t.reshape(1, 1, -1), lambda t: t.reshape(-1)),
}


def _weight_g_from_prototypes(v: np.ndarray) -> np.ndarray:
    return np.ones((v.shape[1], 1, 1), np.float32)


# weight_g is derived from the prototypes on export and only checked (`_check_value`) on import.
_WEIGHT_G: Codec = (_weight_g_from_prototypes, lambda g: g)


@dataclasses.dataclass(frozen=True)
class _Entry:
    key: str  # official state_dict key
    path: tuple[str, ...]  # where the tensor lives in the train state
    codec: Codec
    assign: bool = True  # False: derived on export, only validated on import (weight_g)


def _head_entries(template: Mapping[str, Any], arch: str) -> list[_Entry]:
    """Every non-backbone official key, with its train-state path and layout conversion."""
    has_bn = 'bn1' in template['params']['local_head']
    conv_ids, bn_ids = ((0, 3, 6), (1, 4)) if has_bn else ((0, 2, 4), ())
    entries = [
        _Entry(
            'online_encoder.mask_token',
            ('params', 'mask_token'),
            _MASK_TOKEN[backbone_module(arch).MASK_TOKEN_LAYOUT],
        ),
        _Entry(
            'mim2org.decoder_pred.0.weight',
            ('params', 'decoder', 'decoder_pred', 'kernel'),
            _CONV2D_1X1,
        ),
        _Entry('mim2org.decoder_pred.0.bias', ('params', 'decoder', 'decoder_pred', 'bias'), _SAME),
        _Entry('class_loss.center', ('center',), _CENTER),
        _Entry('queue', ('queue',), _LINEAR),  # (K, D) rows <-> (D, K) columns
        _Entry('queue_ptr', ('queue_ptr',), _QUEUE_PTR),
    ]
    nets = (
        ('online_projector', 'class_projector', STATE_KEYS['student']),
        ('branch_projector', 'branch_class_projector', STATE_KEYS['teacher']),
    )
    for projector, local, (params, stats) in nets:
        for i, fc in zip((0, 3), ('fc1', 'fc2')):
            entries += _affine(f'{projector}.layer.0.{i}', (params, 'projector', fc), _LINEAR)
        for i, fc in zip(conv_ids, ('fc1', 'fc2', 'fc3')):
            entries += _affine(f'{local}.mlp.{i}', (params, 'local_head', fc), _CONV1D)
        for i, bn in zip(bn_ids, ('bn1', 'bn2')):
            p, s = (params, 'local_head', bn), (stats, 'local_head', bn)
            entries += [
                _Entry(f'{local}.mlp.{i}.weight', p + ('scale',), _SAME),
                _Entry(f'{local}.mlp.{i}.bias', p + ('bias',), _SAME),
                _Entry(f'{local}.mlp.{i}.running_mean', s + ('mean',), _SAME),
                _Entry(f'{local}.mlp.{i}.running_var', s + ('var',), _SAME),
            ]
        protos = (params, 'local_head', 'prototypes')
        entries += [
            _Entry(f'{local}.last_layer.weight_v', protos, _CONV1D),  # (B, P) <-> (P, B, 1)
            _Entry(f'{local}.last_layer.weight_g', protos, _WEIGHT_G, assign=False),
        ]
    return entries


def _affine(prefix: str, path: tuple[str, ...], codec: Codec) -> list[_Entry]:
    return [
        _Entry(f'{prefix}.weight', path + ('kernel',), codec),
        _Entry(f'{prefix}.bias', path + ('bias',), _SAME),
    ]


def _num_batches_tracked_keys(entries: list[_Entry]) -> list[str]:
    """BatchNorm1d counters of the local heads: written as 0, optional and ignored on import."""
    suffix = '.running_mean'
    return [
        e.key[: -len(suffix)] + '.num_batches_tracked' for e in entries if e.key.endswith(suffix)
    ]


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def to_official_state_dict(state: Mapping[str, Any], *, arch: str) -> dict[str, np.ndarray]:
    """cmid_jax train state -> the official `PretrainModel.state_dict()` as numpy arrays.

    Wrap it as `{'model': sd}` (plus whatever else) to get a full-checkpoint file the importer
    reads; `extract.py`'s backbone-only file is the `online_encoder.model.` part, prefix stripped.
    """
    module = backbone_module(arch)
    sd: dict[str, np.ndarray] = {}
    for which, prefix in BACKBONE_PREFIXES.items():
        variables = module.to_torch_state_dict(backbone_variables(state, which))
        sd.update({prefix + k: v for k, v in variables.items()})
    entries = _head_entries(state, arch)
    for e in entries:
        value = np.asarray(_get(state, e.path))
        # Writable contiguous copies, so that torch.from_numpy accepts every entry.
        sd[e.key] = np.array(e.codec[0](value))
    for key in _num_batches_tracked_keys(entries):
        sd[key] = np.array(0, np.int64)
    return dict(sorted(sd.items()))


def is_full_checkpoint(keys) -> bool:
    """Whether state_dict keys are a full official `model` state_dict, not only a backbone.

    Keys of the student backbone alone (`online_encoder.model.*`) count as a backbone-only file.
    """
    student = BACKBONE_PREFIXES['student']
    return any(
        k in ('queue', 'queue_ptr')
        or (k.startswith(FULL_CHECKPOINT_MARKERS) and not k.startswith(student))
        for k in keys
    )


def _check_value(key: str, value: np.ndarray) -> str | None:
    # cmid_jax fixes the prototype norm to 1 (DINO norm_last_layer), so any other g would be lost.
    if key.endswith('.weight_g') and not np.allclose(value, 1.0, rtol=0, atol=1e-6):
        return (
            f'must be all ones (cmid_jax fixes the prototype norm to 1); got values in '
            f'[{value.min():.4g}, {value.max():.4g}]'
        )
    return None


def from_official_state_dict(
    state_dict: Mapping[str, Any], *, arch: str, backbone: nn.Module, template: Mapping[str, Any]
) -> dict[str, Any]:
    """Official `model` state_dict -> the train-state parts it determines.

    Args:
      state_dict: numpy arrays or torch tensors under the official keys.
      arch: the cmid_jax backbone arch the checkpoint is read as.
      backbone: the backbone module of the target config (its variant and image size).
      template: a train state or `TrainStep.abstract_state` of the target config; gives every head
        shape, whether the local head has BN, and the dtypes.

    Returns `{'params', 'batch_stats', 'teacher_params', 'teacher_batch_stats', 'queue',
    'queue_ptr', 'center'}`; `step` and `opt_state` are not part of an official checkpoint.
    Raises one ValueError listing every unknown key, missing key, shape mismatch and bad value,
    of the heads and of both backbones.
    """
    module = backbone_module(arch)
    entries = _head_entries(template, arch)
    # The official shape follows from the template by encoding a zero-stride stand-in.
    expected = {
        e.key: e.codec[0](
            np.broadcast_to(
                np.zeros((), _get(template, e.path).dtype), _get(template, e.path).shape
            )
        ).shape
        for e in entries
    }
    optional = dict.fromkeys(_num_batches_tracked_keys(entries))
    in_backbone = lambda k: k.startswith(tuple(BACKBONE_PREFIXES.values()))

    errors, out = [], {}
    try:
        heads = match_state_dict(
            {k: v for k, v in state_dict.items() if not in_backbone(k)},
            expected,
            what='CMID heads/queue/centre',
            optional=optional,
            validate=_check_value,
        )
    except ValueError as err:
        errors.append(str(err))
    else:
        for e in entries:
            if e.assign:
                leaf = _get(template, e.path)
                _set(out, e.path, np.asarray(e.codec[1](heads[e.key]), dtype=leaf.dtype))
    for which, prefix in BACKBONE_PREFIXES.items():
        params, stats = STATE_KEYS[which]
        sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        try:
            variables = module.from_torch_state_dict(sub, backbone)
        except ValueError as err:
            errors.append(f'[{prefix}*, keys listed without the prefix] {err}')
            continue
        _set(out, (params, 'backbone'), variables['params'])
        _set(out, (stats, 'backbone'), variables.get('batch_stats', {}))
    if errors:
        raise ConfigError(
            'official CMID checkpoint does not match the config:\n' + '\n'.join(errors)
        )
    for stats in ('batch_stats', 'teacher_batch_stats'):
        out[stats].setdefault('local_head', {})  # no BN in the local head: an empty collection
    return out
