"""Linear probe: multinomial logistic regression on frozen features, one fixed recipe.

Recipe (no knobs are tuned on the test split):
* features are standardised per dimension with the train split's mean and standard deviation
  (dimensions with std < 1e-6 are only centred); the test split reuses those statistics;
* model: logits = x W + b, W and b start at zero;
* objective: mean softmax cross-entropy + (l2 / 2) * ||W||^2 with l2 = 1e-3 (no penalty on b);
* optimiser: full-batch L-BFGS (optax.lbfgs, memory 10, zoom line search), at most 500
  iterations, stopping early when the gradient norm drops below 1e-5. The objective is strictly
  convex, so the result does not depend on the seed or the batch order: there are none.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

L2 = 1e-3
MAX_ITERS = 500
GRAD_TOL = 1e-5


def standardize_features(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both splits standardised with the train split's per-dimension mean and std."""
    train = np.asarray(train, np.float64)
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std < 1e-6, 1.0, std)
    return (
        ((train - mean) / std).astype(np.float32),
        ((np.asarray(test, np.float64) - mean) / std).astype(np.float32),
    )


@functools.partial(jax.jit, static_argnames=('num_classes', 'max_iters'))
def fit_logistic_regression(
    x: jax.Array,
    y: jax.Array,
    *,
    num_classes: int,
    l2: float = L2,
    max_iters: int = MAX_ITERS,
    tol: float = GRAD_TOL,
) -> dict:
    """Minimises mean cross-entropy + l2/2 ||W||^2 by full-batch L-BFGS; returns {'w', 'b'}."""
    labels = jax.nn.one_hot(y, num_classes)

    def objective(params):
        logits = x @ params['w'] + params['b']
        ce = jnp.mean(optax.softmax_cross_entropy(logits, labels))
        return ce + 0.5 * l2 * jnp.sum(jnp.square(params['w']))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(params, updates), state

    def not_done(carry):
        _, state = carry
        count = optax.tree.get(state, 'count')
        grad = optax.tree.get(state, 'grad')
        return (count == 0) | ((count < max_iters) & (optax.tree.norm(grad) >= tol))

    params = {
        'w': jnp.zeros((x.shape[1], num_classes), jnp.float32),
        'b': jnp.zeros((num_classes,), jnp.float32),
    }
    params, _ = jax.lax.while_loop(not_done, step, (params, opt.init(params)))
    return params


def linear_probe_top1(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    *,
    l2: float = L2,
) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of the recipe's probe on the test split."""
    x_train, x_test = standardize_features(train_feats, test_feats)
    params = fit_logistic_regression(
        jnp.asarray(x_train), jnp.asarray(train_labels, jnp.int32), num_classes=num_classes, l2=l2
    )
    logits = np.asarray(x_test @ np.asarray(params['w']) + np.asarray(params['b']))
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(test_labels)))
