"""Online dense probe for the pretraining loop, next to the online kNN.

`make_online_dense(config)` reads `config.eval.dense_path` once: a segmentation folder
(`images/`, `masks/`, optional `classes.json`) or a change folder (`A/`, `B/`, `label/`), told
apart by its `A/` sub-folder, split by `dense_data.split_names` (fraction
`config.eval.train_fraction`, seed `config.seed`, groups `config.eval.dense_split_group`). The
returned function trains the linear probe of `cmid-evaluate --protocol=segmentation|change` on
the student's last feature map and scores it: the same recipe, numbers and split as the offline
protocol on the same checkpoint, so the curve in metrics.jsonl ends where `cmid-evaluate` starts.
It runs on the host's first device; every process computes it, process 0 writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from cmid_jax.errors import ConfigError
from cmid_jax.evaluation import dense, dense_data
from cmid_jax.models.cmid import backbone_variables

HEAD = 'linear'


def make_online_dense(
    config: ml_collections.ConfigDict, task: dense.DenseTask | None = None
) -> Callable[[dict, str | None], dict[str, float]]:
    """`fn(train_state, preview_png) -> {'dense_miou_student': x}` for a segmentation folder or
    `{'dense_f1_student': x}` (F1 of the changed class) for a change folder (fractions). `task`:
    the folder's layout (default: told by `dense.task_of_folder`)."""
    e = config.eval
    if not e.dense_path:
        raise ConfigError('config.eval.dense_path is not set: no data for the online dense probe')
    task = task or dense.task_of_folder(e.dense_path)
    t0 = time.monotonic()
    dataset = task.list_dataset(e.dense_path)
    split = dense_data.split_names(
        dataset.names, e.train_fraction, config.seed, e.dense_split_group
    )
    data = dense.read_probe_data(dataset, split, config.data, task)
    settings = dense.ProbeSettings(head=HEAD, seed=config.seed, batch_size=e.batch_size)
    name = f'dense_{task.score}_student'
    logging.info(
        'Online dense probe: %s head, split %s, read in %.1f s; logged as %s.',
        HEAD,
        split.digest(),
        time.monotonic() - t0,
        name,
    )

    def evaluate(state: dict, preview: str | None = None) -> dict[str, float]:
        # The replicated student on this host's first device: the probe is a host-side loop.
        variables = jax.tree.map(
            lambda x: np.asarray(x.addressable_data(0)), backbone_variables(state, 'student')
        )
        fields = dense.score_probe(config, variables, data, settings, preview=preview)
        return {name: float(fields[task.score])}

    return evaluate
