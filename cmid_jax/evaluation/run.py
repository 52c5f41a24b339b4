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

The images are read as pretraining read its own, following the workdir's `config.json`
(`data.bands`, `data.dtype`): 8-bit RGB, or any number of raw uint8 / uint16 bands; an image
without those bands or of another pixel type is an error naming it. Prints one JSON line and
appends it to `workdir/eval.jsonl`. Works on any workdir with a checkpoint, including one written
by `cmid_jax.convert.import_torch`.
"""

from __future__ import annotations

import logging
import os
import time

import ml_collections
import numpy as np

from cmid_jax.evaluation import dense, dense_data, dense_head
from cmid_jax.evaluation.features import WHICH, FeatureExtractor, load_images
from cmid_jax.evaluation.finetune import FinetuneRecipe, finetune_top1
from cmid_jax.evaluation.knn import knn_top1
from cmid_jax.evaluation.labelled import load_split
from cmid_jax.evaluation.linear import L2, linear_probe_top1
from cmid_jax.models.cmid import backbone_variables
from cmid_jax.restore import restore_train_state
from cmid_jax.workdir import EVAL, Workdir

CLASSIFICATION = ('knn', 'linear', 'finetune')
DENSE = ('segmentation', 'change')
PROTOCOLS = CLASSIFICATION + DENSE


def evaluate(
    workdir: str,
    data: str,
    protocol: str = 'knn',
    *,
    which: str = 'student',
    train_fraction: float = 0.5,
    seed: int = 0,
    step: int | None = None,
    finetune: FinetuneRecipe | None = None,
    head: str = 'linear',
    split_group: str | None = None,
    scale: float = 1.0,
) -> dict:
    """Runs one protocol on the checkpoint of `step` (default: latest); returns the result and
    appends it as one JSON line to `workdir/eval.jsonl`. Accuracies are fractions in [0, 1].

    `head`, `split_group` and `scale` are for the dense protocols only (see the module
    docstring)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f'protocol must be one of {PROTOCOLS}, got {protocol!r}')
    if which not in WHICH:
        raise ValueError(f'which must be one of {WHICH}, got {which!r}')
    if head not in dense_head.HEADS:
        raise ValueError(f'head must be one of {dense_head.HEADS}, got {head!r}')
    if not scale > 0:
        raise ValueError(f'scale must be positive, got {scale}')
    t0 = time.monotonic()
    if protocol in DENSE:  # Names and split checked before the checkpoint is read.
        task = dense.CHANGE if protocol == 'change' else dense.SEGMENTATION
        dataset = task.list_dataset(data)
        split = dense_data.split_names(dataset.names, train_fraction, seed, split_group)
    config, state, ckpt_step = restore_train_state(workdir, step)
    variables = backbone_variables(state, which)
    eval_batch = int((config.get('eval') or {}).get('batch_size', 128))
    if protocol in DENSE:
        fields = dense.score_probe(
            config,
            variables,
            dense.read_probe_data(dataset, split, config.data, task),
            dense.ProbeSettings(head=head, seed=seed, batch_size=eval_batch, scale=scale),
            preview=Workdir(workdir).images_dir() / f'{protocol}_{ckpt_step}.png',
        )
        fields['split_group'] = split_group
    else:
        fields = _classification(
            config, variables, data, protocol, train_fraction, seed, finetune, eval_batch
        )
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


def _classification(
    config: ml_collections.ConfigDict,
    variables: dict,
    data: str,
    protocol: str,
    train_fraction: float,
    seed: int,
    finetune: FinetuneRecipe | None,
    eval_batch: int,
) -> dict:
    split = load_split(data, train_fraction, seed)
    size = int(config.data.image_size)
    train_images = load_images(split.train_files, size, config.data)
    test_images = load_images(split.test_files, size, config.data)
    train_labels, test_labels = np.asarray(split.train_labels), np.asarray(split.test_labels)
    logging.info(
        '%s on %s: %d classes, %d train / %d test images at %d px.',
        protocol,
        data,
        split.num_classes,
        len(train_images),
        len(test_images),
        size,
    )

    if protocol == 'finetune':
        ft = finetune or FinetuneRecipe(seed=seed)
        top1 = finetune_top1(
            config,
            variables,
            train_images,
            train_labels,
            test_images,
            test_labels,
            split.num_classes,
            ft,
        )
        recipe = {'epochs': ft.epochs, 'batch_size': ft.batch_size, 'lr': ft.lr}
    else:
        eval_cfg = config.get('eval') or {}
        extractor = FeatureExtractor(config, batch_size=eval_batch)
        train_feats = extractor(variables, train_images)
        test_feats = extractor(variables, test_images)
        if protocol == 'knn':
            k, temperature = int(eval_cfg.get('k', 20)), float(eval_cfg.get('temperature', 0.07))
            top1 = knn_top1(
                train_feats,
                train_labels,
                test_feats,
                test_labels,
                split.num_classes,
                k=k,
                temperature=temperature,
            )
            recipe = {'k': k, 'temperature': temperature}
        else:
            top1 = linear_probe_top1(
                train_feats, train_labels, test_feats, test_labels, split.num_classes
            )
            recipe = {'l2': L2}
    return {
        'top1': top1,
        'num_classes': split.num_classes,
        'num_train': len(train_images),
        'num_test': len(test_images),
        'split': split.digest(),
        **recipe,
    }
