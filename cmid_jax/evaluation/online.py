"""Online kNN monitor for the pretraining loop.

`make_online_knn(config)` does the expensive, one-off work when it is built: the seeded per-class
split of `config.eval.path` (fraction `config.eval.train_fraction`, seed `config.seed`), the read
of every image, with the bands and pixel type of `config.data`, into a uint8 / uint16 cache, and
the jitted feature extractor. The returned function then only runs the student and the teacher
backbones over the cached images and the kNN vote (`config.eval.k`, `config.eval.temperature`),
so it can run every `config.eval.every_steps`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import ml_collections
import numpy as np
from jax.sharding import Mesh

from cmid_jax.errors import ConfigError
from cmid_jax.evaluation.features import WHICH, FeatureExtractor, load_images
from cmid_jax.evaluation.knn import knn_top1
from cmid_jax.evaluation.labelled import load_split
from cmid_jax.models.cmid import backbone_variables


def make_online_knn(
    config: ml_collections.ConfigDict, *, mesh: Mesh | None = None
) -> Callable[[dict], dict[str, float]]:
    """`fn(train_state) -> {'knn_top1_student': acc, 'knn_top1_teacher': acc}` (fractions).

    Pass the training `mesh` so that feature batches are split over its devices (the state is
    expected replicated on it); every process of a multi-host job must call the function.
    """
    e = config.eval
    if not e.path:
        raise ConfigError('config.eval.path is not set: no labelled data for the online kNN')
    split = load_split(e.path, e.train_fraction, config.seed)
    size = int(config.data.image_size)
    t0 = time.monotonic()
    train_images = load_images(split.train_files, size, config.data)
    test_images = load_images(split.test_files, size, config.data)
    logging.info(
        'Online kNN on %s: %d classes, %d train / %d test images (split %s), cached '
        'at %d px in %.1f s (%.0f MB).',
        e.path,
        split.num_classes,
        len(train_images),
        len(test_images),
        split.digest(),
        size,
        time.monotonic() - t0,
        (train_images.nbytes + test_images.nbytes) / 2**20,
    )
    extractor = FeatureExtractor(config, batch_size=e.batch_size, mesh=mesh)
    train_labels, test_labels = np.asarray(split.train_labels), np.asarray(split.test_labels)

    def evaluate(state: dict) -> dict[str, float]:
        out = {}
        for which in WHICH:
            variables = backbone_variables(state, which)
            out[f'knn_top1_{which}'] = knn_top1(
                extractor(variables, train_images),
                train_labels,
                extractor(variables, test_images),
                test_labels,
                split.num_classes,
                k=e.k,
                temperature=e.temperature,
            )
        return out

    return evaluate
