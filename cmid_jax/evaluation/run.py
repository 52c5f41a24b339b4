r"""Evaluates a pretrained backbone of a workdir on a labelled dataset.

    python -m cmid_jax.tools.evaluate --workdir=runs/vitb --data=AID --protocol=knn
    python -m cmid_jax.tools.evaluate --workdir=runs/vitb --data=AID --protocol=linear \
        --which=teacher
    python -m cmid_jax.tools.evaluate --workdir=runs/vitb --data=AID --protocol=finetune \
        --epochs=10
    python -m cmid_jax.tools.evaluate --workdir=runs/vitb --data=dubai-seg \
        --protocol=segmentation --split_group='^(tile\d+)_'
    python -m cmid_jax.tools.evaluate --workdir=runs/vitb --data=LEVIR-CD --protocol=change

Classification protocols on a class-per-folder dataset (recipes in the docstrings of
`cmid_jax/evaluation/{knn,linear,finetune}.py`): `knn` (cosine, weighted votes, k and temperature
from the run's `config.eval`, default 20 / 0.07), `linear` (logistic regression on standardised
frozen features, full-batch L-BFGS, L2 1e-3) and `finetune` (backbone + linear head, AdamW,
cosine, RandomResizedCrop + flip, label smoothing 0.1). The split is per class and seeded
(`cmid_jax/evaluation/labelled.py`), identical on every machine.

Dense protocols (`cmid_jax/evaluation/dense.py`, recipe in `dense_head.py`): `segmentation` on
`DATA/images/` + `DATA/masks/` (+ `classes.json`), scored by mIoU, per-class IoU and pixel
accuracy, and `change` on `DATA/A/` + `DATA/B/` + `DATA/label/`, scored by F1, IoU, precision
and recall of the change class: a light head (`head='linear'` or `'fpn'`) on the frozen
backbone's last feature map of `config.data.image_size`-px windows, tiled inference over images
of any size. The split is by image name, or by a group of names (`split_group`), seeded
(`dense_data.py`); a picture of predictions beside labels for a few test images goes to
`workdir/images/<protocol>_<step>.png`.

Every protocol is an entry of `cmid_jax.evaluation.protocols.PROTOCOLS`, with its own options
(`OPTIONS`), its run and, where it has one, its online form in the train loop.

The images are read as pretraining read its own, following the workdir's `config.json`
(`data.bands`, `data.dtype`): 8-bit RGB, or any number of raw uint8 / uint16 bands; an image
without those bands or of another pixel type is an error naming it. Prints one JSON line and
appends it to `workdir/eval.jsonl`. Works on any workdir with a checkpoint, including one written
by `cmid_jax.convert.import_torch`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from cmid_jax.errors import ConfigError
from cmid_jax.evaluation import protocols
from cmid_jax.evaluation.features import WHICH
from cmid_jax.evaluation.protocols import PROTOCOLS
from cmid_jax.models.cmid import backbone_variables
from cmid_jax.restore import restore_train_state
from cmid_jax.workdir import EVAL, Workdir

__all__ = ['PROTOCOLS', 'evaluate']


def evaluate(
    workdir: str,
    data: str,
    protocol: str = 'knn',
    *,
    which: str = 'student',
    train_fraction: float = 0.5,
    seed: int = 0,
    step: int | None = None,
    **options: Any,
) -> dict:
    """Runs one protocol of `protocols.PROTOCOLS` on the checkpoint of `step` (default: latest);
    returns the result and appends it as one JSON line to `workdir/eval.jsonl`. Accuracies are
    fractions in [0, 1].

    `options` are the protocol's own (its `OPTIONS` dataclass, e.g. `epochs=` for `finetune`,
    `head=`, `split_group=`, `scale=` for `segmentation` / `change`); one of another protocol is
    a ValueError. The data is listed and split before the checkpoint is read."""
    owner = protocols.protocol_module(protocol)
    chosen = protocols.make_options(protocol, **options)
    if which not in WHICH:
        raise ConfigError(f'which must be one of {WHICH}, got {which!r}')
    t0 = time.monotonic()
    split = owner.split(data, train_fraction, seed, chosen)
    config, state, ckpt_step = restore_train_state(workdir, step)
    context = protocols.RunContext(
        config=config,
        variables=backbone_variables(state, which),
        data=data,
        seed=seed,
        batch_size=int((config.get('eval') or {}).get('batch_size', 128)),
        preview=Workdir(workdir).images_dir() / f'{protocol}_{ckpt_step}.png',
    )
    fields = owner.run(split, chosen, context)
    result = {
        'protocol': protocol,
        'which': which,
        'step': ckpt_step,
        **fields,
        'train_fraction': train_fraction,
        'seed': seed,
        'data': os.path.abspath(data),
        'arch': config.model.arch,
        'variant': config.model.variant,
        'image_size': int(config.data.image_size),
        'seconds': round(time.monotonic() - t0, 1),
    }
    Workdir(workdir).append_jsonl(EVAL, result)
    return result
