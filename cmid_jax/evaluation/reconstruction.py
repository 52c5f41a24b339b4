"""The student's MIM reconstruction of crop A for a batch, for the reconstruction grids.

Runs exactly what the MIM loss sees: the mean-filled masked crop A plus the mask token through the
student backbone (BatchNorm with batch statistics, as in training; the updated statistics are
discarded) and the decoder. The output is in normalised pixel space, like the MIM target.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections
from jax.sharding import Sharding

from cmid_jax import objective
from cmid_jax.models import cmid


def make_reconstruction_fn(
    config: ml_collections.ConfigDict, *, max_images: int = 8, out_sharding: Sharding | None = None
) -> Callable[[dict, dict], dict[str, jax.Array]]:
    """`fn(state, batch) -> {'img_a', 'mask_a', 'reconstruction'}` of the batch's first
    `max_images` images (jitted once).

    `batch` is the (global) train batch as fed to the train step; pass the replicated sharding
    as `out_sharding` when it is sharded over a mesh, so every process can read the result.
    """
    nets = cmid.build_networks(config)

    def reconstruct(state, batch):
        # The masks of the step that has just run (its augmentation key): what the MIM loss saw.
        views = objective.prepare_views(batch, state['step'] - 1, config)
        params, stats = state['params'], state['batch_stats']
        fmap, _ = nets.apply(
            'backbone',
            {'params': params['backbone'], 'batch_stats': stats.get('backbone', {})},
            views['a']['masked'],
            train=True,
            mask=views['a']['block_mask'],
            mask_token=params['mask_token'],
        )
        rec, _ = nets.apply('decoder', {'params': params['decoder']}, fmap, train=True)
        return {
            'img_a': batch['img_a'][:max_images],
            'mask_a': views['a']['block_mask'][:max_images],
            'reconstruction': rec[:max_images],
        }

    return jax.jit(reconstruct, out_shardings=out_sharding)
