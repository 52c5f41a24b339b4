"""End-to-end fine-tuning: the whole backbone plus a linear head on its global average pool.

Recipe (defaults; `epochs`, `batch_size` and `lr` are arguments):
* start from the chosen backbone's parameters and BatchNorm statistics; the head
  (features -> classes) starts at zero, as in big_vision fine-tuning;
* AdamW (b1 0.9, b2 0.999), peak lr 1e-4 (not scaled with the batch size), weight decay 0.05
  on tensors with ndim > 1 only (as in pretraining), gradients clipped to global norm 1; linear
  warm-up over the first 10% of the steps, then cosine decay to 0;
* 10 epochs of `len(train) // batch_size` steps (remainder dropped; a new seeded order every
  epoch), batch size capped at the train-split size;
* augmentation: RandomResizedCrop to `config.data.image_size` (scale 0.08-1, ratio 3/4-4/3, the
  torchvision sampler, bilinear) of the center-resized image, then a horizontal flip with p 0.5;
  geometric only, so any band count and pixel type (uint8 / uint16) keeps its values' meaning;
* loss: softmax cross-entropy with label smoothing 0.1; BatchNorm in train mode (batch
  statistics, running averages updated), in the backbone's compute dtype;
* evaluation: the test split center-resized, BatchNorm in inference mode; reported: top-1 after the
  last epoch (the official fine-tune reports the best epoch on its test split, which is biased).

Runs on one device (where the starting variables live).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cmid_jax import optim
from cmid_jax.data import resized_crop, sample_crop_box
from cmid_jax.errors import ConfigError
from cmid_jax.evaluation.features import FeatureExtractor
from cmid_jax.models import cmid
from cmid_jax.pixels import normalize_pixels


@dataclasses.dataclass(frozen=True)
class FinetuneRecipe:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    clip_norm: float = 1.0
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.08, 1.0)
    seed: int = 0


def augment(images: np.ndarray, rng: np.random.Generator, scale: tuple[float, float]) -> np.ndarray:
    """RandomResizedCrop back to the input size plus a horizontal flip with p 0.5, per image; any
    band count, the images' own pixel type."""
    out = np.empty_like(images)
    size = images.shape[1]
    for i, image in enumerate(images):
        top, left, h, w = sample_crop_box(rng, size, size, scale=scale)
        crop = resized_crop(image, top, left, h, w, size)
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out


def finetune_top1(
    config: ml_collections.ConfigDict,
    variables: dict,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    recipe: FinetuneRecipe = FinetuneRecipe(),
) -> float:
    """Fine-tunes a copy of `variables` (backbone `{'params', 'batch_stats'}`) with the recipe
    and returns the top-1 accuracy (fraction in [0, 1]) on the test images."""
    nets = cmid.build_networks(config)
    mean, std = tuple(config.data.mean), tuple(config.data.std)
    train_labels = np.asarray(train_labels, np.int32)
    n = len(train_images)
    batch_size = min(recipe.batch_size, n)
    steps_per_epoch = n // batch_size
    total_steps = recipe.epochs * steps_per_epoch
    if total_steps < 1:
        raise ConfigError(f'nothing to train: epochs={recipe.epochs}, {n} train images')

    def pooled(backbone_vars, images, train):
        fmap, new_stats = nets.apply(
            'backbone', backbone_vars, normalize_pixels(images, mean, std), train=train
        )
        return jnp.mean(fmap.astype(jnp.float32), axis=(1, 2)), new_stats

    one = jax.ShapeDtypeStruct((1,) + train_images.shape[1:], train_images.dtype)
    width = jax.eval_shape(lambda v, x: pooled(v, x, False)[0], variables, one).shape[-1]
    params = {
        'backbone': variables['params'],
        'head': {
            'w': jnp.zeros((width, num_classes), jnp.float32),
            'b': jnp.zeros((num_classes,), jnp.float32),
        },
    }
    params = jax.tree.map(jnp.array, params)  # A copy: the caller's state is not donated.
    batch_stats = jax.tree.map(jnp.array, variables['batch_stats'])

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, recipe.lr, int(recipe.warmup_fraction * total_steps), total_steps
    )
    tx = optax.chain(
        optax.clip_by_global_norm(recipe.clip_norm),
        optax.adamw(schedule, weight_decay=recipe.weight_decay, mask=optim.weight_decay_mask),
    )
    opt_state = tx.init(params)

    def train_step(params, batch_stats, opt_state, images, labels):
        def loss_fn(p):
            feats, new_stats = pooled(
                {'params': p['backbone'], 'batch_stats': batch_stats}, images, True
            )
            logits = feats @ p['head']['w'] + p['head']['b']
            targets = optax.smooth_labels(
                jax.nn.one_hot(labels, num_classes), recipe.label_smoothing
            )
            return jnp.mean(optax.softmax_cross_entropy(logits, targets)), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    train_step = jax.jit(train_step, donate_argnums=(0, 1, 2))
    rng = np.random.default_rng(recipe.seed)
    for epoch in range(recipe.epochs):
        order = rng.permutation(n)
        for s in range(steps_per_epoch):
            idx = order[s * batch_size : (s + 1) * batch_size]
            images = augment(train_images[idx], rng, recipe.crop_scale)
            params, batch_stats, opt_state, loss = train_step(
                params, batch_stats, opt_state, images, train_labels[idx]
            )
        logging.info('fine-tune epoch %d/%d: loss %.4f', epoch + 1, recipe.epochs, float(loss))

    feats = FeatureExtractor(config, batch_size=batch_size)(
        {'params': params['backbone'], 'batch_stats': batch_stats}, test_images
    )
    logits = feats @ np.asarray(params['head']['w']) + np.asarray(params['head']['b'])
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(test_labels)))
