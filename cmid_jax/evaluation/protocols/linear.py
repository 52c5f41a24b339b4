"""The `linear` protocol: logistic regression on standardised frozen global features, the fixed
recipe of `evaluation/linear.py` (full-batch L-BFGS, L2 1e-3). No online form."""

from __future__ import annotations

import dataclasses

from cmid_jax.evaluation.labelled import ClassSplit
from cmid_jax.evaluation.linear import L2, linear_probe_top1
from cmid_jax.evaluation.protocols import base


@dataclasses.dataclass(frozen=True)
class LinearOptions:
    """None: the recipe is fixed (no knob is tuned on the test split)."""


OPTIONS = LinearOptions
ONLINE = None
split = base.class_split


def run(split: ClassSplit, options: LinearOptions, context: base.RunContext) -> dict:
    images = base.load_class_images(split, 'linear', context)
    top1 = base.frozen_top1(linear_probe_top1, images, context)
    return base.classification_fields(images, top1, l2=L2)
