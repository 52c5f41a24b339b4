"""Light heads on frozen feature maps for the dense probes, and their one fixed training recipe.

Heads (`HEADS`), both on the backbone's last feature map (stride s: 16 for the ViTs, 32 for the
ResNets and Swins), whose channels are first standardised with the train windows' per-channel
mean and standard deviation (channels with std < 1e-6 only centred):
* `linear`: a 1x1 convolution to the classes on the bilinearly upsampled features. Both steps
  are linear, so it is computed as the 1x1 convolution at stride s followed by the upsampling;
* `fpn`: a small FPN-style top-down head on the last stage alone (the backbones return one map,
  so there are no lateral inputs from earlier stages): a 1x1 projection to 64 channels and a 3x3
  convolution + GroupNorm (8 groups) + ReLU at stride s, a 2x bilinear upsampling, a 3x3
  convolution to 32 channels + GroupNorm + ReLU at stride s/2 and a 1x1 convolution to the
  classes. Kept this small so that its 1,000 steps stay within a minute or so on 2 CPU cores for
  a ViT-S/16 at 224 px.
The head's class logits are upsampled bilinearly (half-pixel centres) to the resolution needed:
the label grid in training, the window's pixels at inference.

Recipe (fixed once, before the ablation; the learning rate was picked on synthetic features and
the train loss, not on a test split): the targets are the labels of every 4th pixel of each
train window (rows and columns 2, 6, 10, ...), so a 224-px window gives a 56x56 label grid; the
loss is the softmax cross-entropy averaged over the labelled points of the batch (the ignore
value left out), for change detection weighted by class so that both classes weigh the same in
total over the train targets (each point's weight is the inverse of its class's frequency: with
0.2-15% changed pixels an unweighted probe on weak features answers "unchanged" everywhere, F1 =
0); AdamW (weight decay 1e-4) at learning rate 1e-2 with cosine decay to 0 over 1,000 steps of
16 windows drawn at random with replacement from all train windows (seeded by the split seed),
on the cached features.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cmid_jax.errors import ConfigError

HEADS = ('linear', 'fpn')
LABEL_STRIDE = 4
STEPS = 1000
BATCH_SIZE = 16
LR = 1e-2
WEIGHT_DECAY = 1e-4
FPN_WIDTH = 64
IGNORE = 255  # Ignored target value in training (the change protocol has none to ignore).


class LinearHead(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.num_classes)(x)  # A 1x1 convolution.


class FPNHead(nn.Module):
    num_classes: int
    width: int = FPN_WIDTH

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv_norm_relu = lambda x, width: nn.relu(
            nn.GroupNorm(num_groups=8)(nn.Conv(width, (3, 3))(x))
        )
        x = conv_norm_relu(nn.Dense(self.width)(x), self.width)
        b, h, w, c = x.shape
        x = jax.image.resize(x, (b, 2 * h, 2 * w, c), 'bilinear')
        return nn.Dense(self.num_classes)(conv_norm_relu(x, self.width // 2))


def build_head(name: str, num_classes: int) -> nn.Module:
    if name == 'linear':
        return LinearHead(num_classes)
    if name == 'fpn':
        return FPNHead(num_classes)
    raise ConfigError(f'head must be one of {HEADS}, got {name!r}')


def channel_stats(inputs: np.ndarray) -> dict:
    """{'mean', 'std'} per channel of (N, h, w, D) features, float32 (std 1 where < 1e-6)."""
    flat = inputs.reshape(-1, inputs.shape[-1])
    mean = flat.mean(0, dtype=np.float64)
    std = np.sqrt(np.maximum(np.mean(np.square(flat, dtype=np.float64), 0) - mean**2, 0))
    return {
        'mean': mean.astype(np.float32),
        'std': np.where(std < 1e-6, 1.0, std).astype(np.float32),
    }


def head_logits(
    head: nn.Module, params: dict, stats: dict, inputs: jax.Array, out_size: int
) -> jax.Array:
    """(B, h, w, D) features -> (B, out_size, out_size, classes) logits, bilinearly upsampled."""
    logits = head.apply({'params': params}, (inputs - stats['mean']) / stats['std'])
    b, _, _, c = logits.shape
    return jax.image.resize(logits.astype(jnp.float32), (b, out_size, out_size, c), 'bilinear')


def label_grid(label_windows: np.ndarray) -> np.ndarray:
    """(N, S, S) labels -> the (N, S/4, S/4) training targets: every 4th pixel from the 2nd."""
    return label_windows[:, LABEL_STRIDE // 2 :: LABEL_STRIDE, LABEL_STRIDE // 2 :: LABEL_STRIDE]


def balanced_weights(targets: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class loss weights, the inverse of each class's frequency among the labelled
    `targets` (normalised to mean 1 over the points), so that every class weighs the same."""
    counts = np.bincount(targets[targets != IGNORE].ravel(), minlength=num_classes)
    return (counts.sum() / (num_classes * np.maximum(counts, 1))).astype(np.float32)


def train_head(
    head: nn.Module,
    inputs: np.ndarray,
    targets: np.ndarray,
    stats: dict,
    *,
    seed: int = 0,
    steps: int = STEPS,
    class_weights: np.ndarray | None = None,
) -> tuple[dict, np.ndarray]:
    """Fits `head` on (N, h, w, D) cached features and (N, L, L) uint8 targets (`IGNORE` left
    out) by the recipe above, with per-class loss weights if given; returns (params, the loss of
    each step).

    One jitted step per Python iteration rather than a `fori_loop`: XLA:CPU runs convolutions
    inside a loop body about 90x slower than at top level (measured with jax 0.10.2), which made
    the `fpn` head take minutes. The step and the init are module-level jitted functions of the
    head, so a probe trained again on same-shaped features (the online probe) compiles nothing."""
    inputs, targets = jnp.asarray(inputs), jnp.asarray(targets, jnp.int32)
    stats = jax.tree.map(jnp.asarray, stats)
    init_key, data_key = jax.random.split(jax.random.key(seed))
    params = _init_head(head, init_key, inputs[:1])
    num_classes = jax.eval_shape(head.apply, {'params': params}, inputs[:1]).shape[-1]
    weights = jnp.ones(num_classes) if class_weights is None else jnp.asarray(class_weights)
    data = HeadTrainingData(inputs, targets, stats, weights, data_key)
    opt_state, losses = _optimizer(steps).init(params), []
    for i in range(steps):  # Dispatched asynchronously; the losses are fetched once at the end.
        params, opt_state, loss = _train_step(
            params, opt_state, data=data, step=i, head=head, steps=steps
        )
        losses.append(loss)
    return params, np.asarray(jax.device_get(losses))


def _optimizer(steps: int) -> optax.GradientTransformation:
    return optax.adamw(optax.cosine_decay_schedule(LR, steps), weight_decay=WEIGHT_DECAY)


@functools.partial(jax.jit, static_argnums=0)
def _init_head(head: nn.Module, key: jax.Array, example: jax.Array) -> dict:
    return head.init(key, example)['params']


class HeadTrainingData(NamedTuple):
    """What every training step of a head reads (a pytree: arguments of the jitted step, not
    constants baked into the program)."""

    inputs: jax.Array  # (N, h, w, D) cached features.
    targets: jax.Array  # (N, L, L) int32 class indices, `IGNORE` where unlabelled.
    stats: dict  # Per-channel {'mean', 'std'} of the inputs (`channel_stats`).
    class_weights: jax.Array  # (classes,) loss weight of each class.
    key: jax.Array  # Draws each step's batch (folded with the step index).


@functools.partial(jax.jit, static_argnames=('head', 'steps'))
def _train_step(
    params: dict,
    opt_state: optax.OptState,
    *,
    data: HeadTrainingData,
    step: jax.Array | int,
    head: nn.Module,
    steps: int,
):
    """Step `step` of `steps`: one AdamW step on a random batch of the cached features."""

    def loss_fn(params, x, y):
        logits = head_logits(head, params, data.stats, x, data.targets.shape[1])
        valid = y != IGNORE
        y = jnp.where(valid, y, 0)
        w = data.class_weights[y] * valid
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1e-12)

    num = data.inputs.shape[0]
    idx = jax.random.randint(jax.random.fold_in(data.key, step), (BATCH_SIZE,), 0, num)
    loss, grads = jax.value_and_grad(loss_fn)(params, data.inputs[idx], data.targets[idx])
    updates, opt_state = _optimizer(steps).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
