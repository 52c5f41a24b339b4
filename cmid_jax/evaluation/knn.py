"""Weighted k-nearest-neighbour classifier on frozen features (DINO / InstDisc protocol).

Features are L2-normalised, so similarity is cosine. For each test sample the k most similar
train samples vote for their class with weight `exp(similarity / temperature)`; the class with
the largest summed weight is the prediction (ties go to the lower label). Defaults k = 20,
temperature 0.07, as in DINO's `eval_knn.py`.

Runs in JAX on the default device (chunked over test samples, one compiled shape), so the
similarity matrix of a large evaluation set is a device matmul, not a host one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cmid_jax.models.heads import l2_normalize


@functools.partial(jax.jit, static_argnames=('num_classes', 'k'))
def _class_scores(train_feats, train_labels, queries, temperature, *, num_classes: int, k: int):
    sims = jnp.matmul(queries, train_feats.T, precision=jax.lax.Precision.HIGHEST)
    top_sims, top_idx = jax.lax.top_k(sims, k)
    weights = jnp.exp(top_sims / temperature)
    votes = jax.nn.one_hot(train_labels[top_idx], num_classes, dtype=jnp.float32)
    return jnp.einsum('qk,qkc->qc', weights, votes)


def knn_scores(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> np.ndarray:
    """(num_test, num_classes) summed vote weights; k is capped at the number of train samples."""
    k = min(int(k), len(train_feats))
    train = l2_normalize(jnp.asarray(train_feats, jnp.float32))
    labels = jnp.asarray(train_labels, jnp.int32)
    test = np.asarray(test_feats, np.float32)
    chunk = min(chunk, len(test))
    out = []
    for start in range(0, len(test), chunk):
        q = test[start : start + chunk]
        pad = chunk - len(q)
        if pad:
            q = np.concatenate([q, np.zeros((pad, q.shape[1]), q.dtype)])
        scores = _class_scores(
            train,
            labels,
            l2_normalize(jnp.asarray(q)),
            jnp.float32(temperature),
            num_classes=num_classes,
            k=k,
        )
        out.append(scores[: chunk - pad])
    return np.concatenate([np.asarray(s) for s in jax.device_get(out)])


def knn_top1(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of the weighted kNN classifier."""
    scores = knn_scores(
        train_feats, train_labels, test_feats, num_classes, k=k, temperature=temperature
    )
    return float(np.mean(np.argmax(scores, axis=1) == np.asarray(test_labels)))
