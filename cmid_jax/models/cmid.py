"""The CMID networks as separate Linen modules over plain parameter trees.

Student variables: `{'backbone', 'projector', 'local_head', 'decoder', 'mask_token'}`; the EMA
teacher holds only `TEACHER_KEYS` (no mask token, no decoder: official `momentum_pairs`). Keeping
the backbone tree free of CMID-specific leaves makes its export a pure rename and transpose.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cmid_jax.data.bands import num_bands
from cmid_jax.models import build_backbone
from cmid_jax.models import remat as remat_lib
from cmid_jax.models.heads import LocalHead, MIMDecoder, Projector

TEACHER_KEYS = ('backbone', 'projector', 'local_head')
# Train-state keys of each network's (params, batch_stats); 'student' is the deployed network.
STATE_KEYS = {
    'student': ('params', 'batch_stats'),
    'teacher': ('teacher_params', 'teacher_batch_stats'),
}


@dataclasses.dataclass(frozen=True)
class Networks:
    backbone: nn.Module
    projector: Projector
    local_head: LocalHead
    decoder: MIMDecoder
    grid: int  # Side of the mask / local-matching grid: image_size // mask.patch_size.
    in_chans: int = 3  # Input bands (config.data.bands); the MIM decoder rebuilds as many.

    def apply(self, name: str, variables: dict, *args, train: bool, **kwargs) -> tuple[Any, dict]:
        """Applies sub-network `name`; returns (output, updated batch_stats or {})."""
        module = getattr(self, name)
        if name == 'projector' or name == 'decoder':
            return module.apply({'params': variables['params']}, *args, **kwargs), {}
        out, mutated = module.apply(
            variables, *args, train=train, mutable=['batch_stats'], **kwargs
        )
        return out, mutated.get('batch_stats', {})


# model.compute_dtype: activations; params, optimizer, teacher and losses stay float32.
COMPUTE_DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}


def build_networks(
    config: ml_collections.FrozenConfigDict, platform: str | None = None
) -> Networks:
    """The networks of a resolved `config` (`cmid_jax.config_resolve.resolve`), for lowering on
    `platform` (None = this machine's)."""
    dtype = COMPUTE_DTYPES[config.model.compute_dtype]
    m = config.model
    backbone = build_backbone(
        m.arch,
        m.variant,
        img_size=config.data.image_size,
        dtype=dtype,
        attention_impl=m.attention_impl,
        platform=platform,
        remat=remat_lib.static(m.remat),
    )
    in_chans = num_bands(config.data)
    return Networks(
        backbone=backbone,
        projector=Projector(m.proj_hidden_dim, m.proj_dim, dtype=dtype),
        local_head=LocalHead(
            m.local_hidden_dim,
            m.local_bottleneck_dim,
            m.local_prototypes,
            use_bn=m.local_use_bn,
            dtype=dtype,
        ),
        decoder=MIMDecoder(stride=backbone.feature_stride, out_chans=in_chans, dtype=dtype),
        grid=config.data.image_size // config.mask.patch_size,
        in_chans=in_chans,
    )


def init_student(nets: Networks, rng: jax.Array, image_size: int) -> tuple[dict, dict]:
    """Returns (params, batch_stats) of a freshly initialised student."""
    k_bb, k_proj, k_loc, k_dec = jax.random.split(rng, 4)
    x = jnp.zeros((2, image_size, image_size, nets.in_chans), jnp.float32)
    bb = nets.backbone.init(k_bb, x, train=False)
    fmap = jax.eval_shape(lambda v: nets.backbone.apply(v, x, train=False), bb)
    width = fmap.shape[-1]
    feats = jnp.zeros((2, 4, width), jnp.float32)
    loc = nets.local_head.init(k_loc, feats, train=False)
    params = {
        'backbone': bb['params'],
        'projector': nets.projector.init(k_proj, jnp.zeros((2, width)))['params'],
        'local_head': loc['params'],
        'decoder': nets.decoder.init(k_dec, jnp.zeros((2, 1, 1, width)))['params'],
        # Zero-initialised and added at the backbone's injection point (official MaskResNet/MaskSwin).
        'mask_token': jnp.zeros((nets.backbone.mask_token_width,), jnp.float32),
    }
    batch_stats = {'backbone': bb.get('batch_stats', {}), 'local_head': loc.get('batch_stats', {})}
    return params, batch_stats


def teacher_from_student(params: dict, batch_stats: dict) -> tuple[dict, dict]:
    """The teacher starts as an exact copy of the student's EMA'd parts (init_momentum_pairs)."""
    copy = lambda tree: jax.tree.map(jnp.array, tree)
    return (
        {k: copy(params[k]) for k in TEACHER_KEYS},
        {k: copy(v) for k, v in batch_stats.items()},
    )


def backbone_variables(state: dict, which: str = 'student') -> dict:
    """`{'params', 'batch_stats'}` of the student's or the EMA teacher's backbone in a train state;
    `batch_stats` is `{}` for backbones without BatchNorm."""
    if which not in STATE_KEYS:
        raise ValueError(f'which must be one of {sorted(STATE_KEYS)}, got {which!r}')
    params, stats = STATE_KEYS[which]
    return {'params': state[params]['backbone'], 'batch_stats': state[stats].get('backbone', {})}
