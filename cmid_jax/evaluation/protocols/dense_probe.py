"""The dense protocols, `segmentation` and `change`: one `DenseProtocol` per `dense.DenseTask`,
which carries what differs between them. Their options, the listing and split of a data folder
by image name (before the checkpoint is read), the probe's run and its online form."""

from __future__ import annotations

import dataclasses

from cmid_jax import visualize
from cmid_jax.evaluation import dense, dense_data, dense_head, online_dense
from cmid_jax.evaluation.protocols.base import OnlineEval, RunContext, option


@dataclasses.dataclass(frozen=True)
class DenseOptions:
    head: str = option('linear', 'the head on the frozen feature map.', choices=dense_head.HEADS)
    split_group: str | None = option(
        None,
        "regular expression whose first group in an image's name is its split unit (default: "
        "the name), e.g. '^(tile\\d+)_'.",
    )
    scale: float = option(
        1.0, 'resize the images by this factor before the windows slide over them.'
    )

    def __post_init__(self):
        dense.ProbeSettings(head=self.head, scale=self.scale)  # Raises on a bad value.


@dataclasses.dataclass(frozen=True)
class DenseSplit:
    """A dense data folder listed, checked by name and split by image (or group of images)."""

    task: dense.DenseTask
    dataset: dense_data.DenseSet
    names: dense_data.NameSplit


class DenseProtocol:
    """The protocol of one `dense.DenseTask`: `segmentation` (`DATA/images/` + `DATA/masks/`
    (+ `classes.json`), scored by mIoU, per-class IoU and pixel accuracy) or `change` (`DATA/A/`
    + `DATA/B/` + `DATA/label/`, scored by F1, IoU, precision and recall of the change class): a
    light head on the frozen last feature map (`evaluation/dense.py`). Online, the linear probe on
    `config.eval.dense_path` when that folder is laid out for the task (`online_dense.py`)."""

    OPTIONS = DenseOptions

    def __init__(self, task: dense.DenseTask):
        self.task = task
        self.ONLINE = OnlineEval(
            curve='dense',
            metric_prefix='dense_',
            enabled=self._online_enabled,
            build=lambda config, mesh: online_dense.make_online_dense(config, task),
            plot=lambda metrics, png, names: visualize.plot_training_curves(
                metrics, png, names=names, columns=1
            ),
            preview=True,
        )

    def _online_enabled(self, config) -> bool:
        return bool(config.eval.dense_path) and self.task.is_folder(config.eval.dense_path)

    def split(
        self, data: str, train_fraction: float, seed: int, options: DenseOptions
    ) -> DenseSplit:
        dataset = self.task.list_dataset(data)
        names = dense_data.split_names(dataset.names, train_fraction, seed, options.split_group)
        return DenseSplit(self.task, dataset, names)

    def run(self, split: DenseSplit, options: DenseOptions, context: RunContext) -> dict:
        settings = dense.ProbeSettings(
            head=options.head, seed=context.seed, batch_size=context.batch_size, scale=options.scale
        )
        data = dense.read_probe_data(split.dataset, split.names, context.config.data, split.task)
        fields = dense.score_probe(
            context.config, context.variables, data, settings, preview=context.preview
        )
        return {**fields, 'split_group': options.split_group}

    def __repr__(self) -> str:
        return f'DenseProtocol({self.task.name!r})'
