"""The `finetune` protocol: the whole backbone and a linear head trained end to end
(`evaluation/finetune.py`, `FinetuneRecipe` with the options below and the split seed). No
online form."""

from __future__ import annotations

import dataclasses

from cmid_jax.evaluation.finetune import FinetuneRecipe, finetune_top1
from cmid_jax.evaluation.labelled import ClassSplit
from cmid_jax.evaluation.protocols import base

_RECIPE = FinetuneRecipe()


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    epochs: int = base.option(_RECIPE.epochs, 'epochs over the train split.')
    batch_size: int = base.option(_RECIPE.batch_size, 'batch size (capped at the train split).')
    lr: float = base.option(_RECIPE.lr, 'peak AdamW lr.')


OPTIONS = FinetuneOptions
ONLINE = None
split = base.class_split


def run(split: ClassSplit, options: FinetuneOptions, context: base.RunContext) -> dict:
    images = base.load_class_images(split, 'finetune', context)
    recipe = FinetuneRecipe(
        epochs=options.epochs, batch_size=options.batch_size, lr=options.lr, seed=context.seed
    )
    top1 = finetune_top1(
        context.config,
        context.variables,
        images.train_images,
        images.train_labels,
        images.test_images,
        images.test_labels,
        split.num_classes,
        recipe,
    )
    return base.classification_fields(
        images, top1, epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr
    )
