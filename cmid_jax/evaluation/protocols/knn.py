"""The `knn` protocol: weighted kNN on frozen global features (`evaluation/knn.py`), with k and
the temperature of the run's `config.eval` (default 20 / 0.07); online, the kNN monitor of both
backbones on `config.eval.path` (`evaluation/online.py`)."""

from __future__ import annotations

import dataclasses

from cmid_jax import visualize
from cmid_jax.evaluation import online
from cmid_jax.evaluation.knn import knn_top1
from cmid_jax.evaluation.labelled import ClassSplit
from cmid_jax.evaluation.protocols import base


@dataclasses.dataclass(frozen=True)
class KnnOptions:
    """None of its own: k and the temperature are the pretraining run's (`config.eval`), as the
    online kNN's, so that both score alike."""


OPTIONS = KnnOptions
split = base.class_split


def run(split: ClassSplit, options: KnnOptions, context: base.RunContext) -> dict:
    images = base.load_class_images(split, 'knn', context)
    eval_cfg = context.config.get('eval') or {}
    k, temperature = int(eval_cfg.get('k', 20)), float(eval_cfg.get('temperature', 0.07))
    top1 = base.frozen_top1(knn_top1, images, context, k=k, temperature=temperature)
    return base.classification_fields(images, top1, k=k, temperature=temperature)


def _build_online(config, mesh):
    evaluate = online.make_online_knn(config, mesh=mesh)
    return lambda state, preview=None: evaluate(state)


ONLINE = base.OnlineEval(
    curve='knn',
    metric_prefix='knn_top1',
    enabled=lambda config: bool(config.eval.path),
    build=_build_online,
    plot=lambda metrics, png, names: visualize.plot_knn_curve(metrics, png),
)
