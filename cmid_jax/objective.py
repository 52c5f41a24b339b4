"""The CMID objective for one batch: student and teacher forwards and the three losses.

Follows `MoCoBasedDDP.forward` of the official code (cmid-method.md sections 5-6): the student
sees the two mean-filled masked crops, the teacher the two unmasked crops. A backbone with
BatchNorm sees each crop in its own call, so its statistics stay per crop; the others see both
crops in one call. Everything returned is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from cmid_jax import augment, losses
from cmid_jax.data.bands import type_max
from cmid_jax.models.cmid import Networks
from cmid_jax.pixels import standardize_pixels


def upsample_mask(block_mask: jax.Array, factor: int) -> jax.Array:
    """(B, g, g) block mask -> (B, g*factor, g*factor) float mask by nearest neighbour."""
    m = block_mask.astype(jnp.float32)
    return jnp.repeat(jnp.repeat(m, factor, axis=1), factor, axis=2)


def mean_fill(x: jax.Array, pixel_mask: jax.Array) -> jax.Array:
    """Masked pixels take the crop's per-channel mean, computed before masking (A2MIM style)."""
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    m = pixel_mask[..., None]
    return x * (1.0 - m) + mean * m


def prepare_views(batch: dict, step: jax.Array, config: ml_collections.FrozenConfigDict) -> dict:
    """Device-side preprocessing of a pipeline batch for train step `step`: crop B's photometric
    augmentation and both block masks (`cmid_jax/augment.py`), normalisation, and the student's
    mean-filled masked inputs."""
    d, mask = config.data, config.mask
    scale = type_max(batch['img_a'].dtype)
    pixels = augment.augment_batch(
        batch,
        augment.step_key(config.seed, step),
        mask_ratio=mask.ratio,
        mask_patch=mask.patch_size,
        value_range=None if d.value_range is None else tuple(d.value_range),
        rgb=d.rgb,
    )
    views = {}
    for v in ('a', 'b'):
        x = standardize_pixels(pixels[f'img_{v}'] / scale, d.mean, d.std)
        pm = upsample_mask(pixels[f'mask_{v}'], mask.patch_size)
        views[v] = dict(
            target=x,
            masked=mean_fill(x, pm),
            pixel_mask=pm,
            block_mask=pixels[f'mask_{v}'],
            loc=batch[f'loc_{v}'],
        )
    return views


def pool_to_grid(fmap: jax.Array, grid: int) -> jax.Array:
    """Average-pools a (B, h, w, C) map to (B, grid, grid, C); ViT-B/16 maps are 14x14 -> 7x7."""
    b, h, w, c = fmap.shape
    if h % grid or w % grid:
        raise ValueError(f'feature map {h}x{w} cannot be pooled to the {grid}x{grid} mask grid')
    fh, fw = h // grid, w // grid
    return fmap.reshape(b, grid, fh, grid, fw, c).mean(axis=(2, 4))


def over_crops(fn, per_crop: bool, **inputs: dict) -> dict:
    """`fn(**inputs)` for crops 'a' and 'b' (each input a {'a': x, 'b': y} dict): one call per
    crop, or one call on both crops stacked on the batch axis (A first), split afterwards."""
    if per_crop:
        return {v: fn(**{k: x[v] for k, x in inputs.items()}) for v in ('a', 'b')}
    out = fn(**{k: jnp.concatenate([x['a'], x['b']]) for k, x in inputs.items()})
    out_a, out_b = jnp.split(out, 2)
    return {'a': out_a, 'b': out_b}


def cmid_loss(
    student: dict,
    teacher: dict,
    queue: jax.Array,
    center: jax.Array,
    views: dict,
    *,
    nets: Networks,
    loss: ml_collections.FrozenConfigDict,
    teacher_temp: jax.Array,
    per_crop: bool | None = None,
):
    """Returns (total loss, aux) for one batch.

    `student` = {'params', 'batch_stats'} (differentiated through 'params'); `teacher` likewise
    (constant); `loss` is the resolved `config.loss`. aux holds every loss term, the updated batch statistics, queue keys and centre,
    and health signals; the caller applies them. `per_crop` runs the backbones once per crop;
    None = only for a backbone with batch statistics (tests compare both paths).
    """
    sp, sbs = student['params'], dict(student['batch_stats'])
    tp, tbs = teacher['params'], dict(teacher['batch_stats'])

    def run(name, params, stats, *args, train=True, **kw):
        variables = {'params': params[name]}
        if name in stats:
            variables['batch_stats'] = stats[name]
        out, new = nets.apply(name, variables, *args, train=train, **kw)
        if new:
            stats[name] = new
        return out

    # Backbones. A BatchNorm backbone runs once per crop, so its statistics stay per crop as in
    # the official two forward passes; any other runs once on both crops (the same values, half
    # the calls: larger matmuls and one pass over the weights).
    if per_crop is None:
        per_crop = bool(jax.tree.leaves(sbs.get('backbone', {})))
    crops = lambda key: {v: views[v][key] for v in ('a', 'b')}
    s_map = over_crops(
        lambda x, mask: run('backbone', sp, sbs, x, mask=mask, mask_token=sp['mask_token']),
        per_crop,
        x=crops('masked'),
        mask=crops('block_mask'),
    )
    t_map = over_crops(
        lambda x: jax.lax.stop_gradient(run('backbone', tp, tbs, x)), per_crop, x=crops('target')
    )

    terms = {}
    aux = {}
    zero = jnp.zeros((), jnp.float32)

    # MIM: rebuild the normalised unmasked crop from the student's masked-crop features.
    if loss.use_mim:
        rec = {v: run('decoder', sp, sbs, s_map[v]) for v in ('a', 'b')}
        terms['mim'] = (
            sum(
                losses.mim_loss(rec[v], views[v]['target'], views[v]['pixel_mask'])
                for v in ('a', 'b')
            )
            / 2
        )
        aux['reconstruction'] = rec['a']
    else:
        terms['mim'] = zero

    # Global: crossed InfoNCE, student(masked A) vs teacher(B) and student(masked B) vs teacher(A).
    q = {
        v: run('projector', sp, sbs, s_map[v].astype(jnp.float32).mean(axis=(1, 2)))
        for v in ('a', 'b')
    }
    if loss.use_global:
        k = {
            v: jax.lax.stop_gradient(
                run('projector', tp, tbs, t_map[v].astype(jnp.float32).mean(axis=(1, 2)))
            )
            for v in ('a', 'b')
        }
        terms['global'] = (
            losses.infonce_loss(q['a'], k['b'], queue, loss.temperature)
            + losses.infonce_loss(q['b'], k['a'], queue, loss.temperature)
        ) / 2
        aux['new_keys'] = jnp.concatenate([k['b'], k['a']])  # Official enqueue order: view, img.
    else:
        terms['global'] = zero

    # Local: DINO cross-entropy on the best nearest-neighbour matched grid positions.
    if loss.use_local:
        loss_local = zero
        for s, t in (('a', 'b'), ('b', 'a')):
            idx_s, idx_t = losses.match_positions(
                views[s]['loc'], views[t]['loc'], loss.num_matches
            )
            s_feat = losses.gather_positions(pool_to_grid(s_map[s], nets.grid), idx_s)
            t_feat = losses.gather_positions(pool_to_grid(t_map[t], nets.grid), idx_t)
            s_out = run('local_head', sp, sbs, s_feat)
            t_out = jax.lax.stop_gradient(run('local_head', tp, tbs, t_feat))
            loss_local += losses.dino_local_loss(
                s_out, t_out, center, loss.student_temp, teacher_temp
            )
            # The official LocalLoss updates its centre after each of its two calls (Q6).
            center = losses.update_center(center, t_out, loss.center_momentum)
        terms['local'] = loss_local / 2
    else:
        terms['local'] = zero

    total = terms['mim'] + terms['global'] + terms['local']
    aux.update(
        terms=terms,
        student_batch_stats=sbs,
        teacher_batch_stats=tbs,
        center=center,
        embedding_std=jnp.mean(jnp.std(q['a'], axis=0)),
        teacher_temp=teacher_temp,
    )
    return total, aux


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """FIFO insert of `keys` at `ptr`, wrapping around; each key enters once (Q2 fixed)."""
    size = queue.shape[0]
    idx = (ptr + jnp.arange(keys.shape[0])) % size
    return queue.at[idx].set(keys.astype(queue.dtype)), (ptr + keys.shape[0]) % size


def masked_psnr(
    reconstruction: jax.Array, target: jax.Array, pixel_mask: jax.Array, std
) -> jax.Array:
    """PSNR (dB, 0-1 pixel scale) of the reconstruction on masked pixels: a health signal."""
    diff = (reconstruction - target) * jnp.asarray(std, jnp.float32)
    mse = jnp.sum(jnp.square(diff) * pixel_mask[..., None]) / (
        jnp.sum(pixel_mask) * diff.shape[-1] + 1e-8
    )
    return -10.0 * jnp.log10(mse + 1e-10)
