r"""Evaluates a pretrained backbone of a workdir on a labelled dataset (`cmid-evaluate`).

    cmid-evaluate --workdir=runs/vitb --data=AID --protocol=knn
    cmid-evaluate --workdir=runs/vitb --data=AID --protocol=linear --which=teacher
    cmid-evaluate --workdir=runs/vitb --data=AID --protocol=finetune --epochs=10
    cmid-evaluate --workdir=runs/vitb --data=dubai-seg --protocol=segmentation \
        --split_group='^(tile\d+)_'
    cmid-evaluate --workdir=runs/vitb --data=levir-cd --protocol=change --head=fpn

Prints one JSON line and appends it to `workdir/eval.jsonl`; see `cmid_jax.evaluation.run`.
Data that cannot be evaluated (a missing or misfit file, a bad value) ends the program with one
line naming it, without a traceback.
"""

import json

from absl import app, flags

from cmid_jax import errors
from cmid_jax.evaluation.dense_head import HEADS
from cmid_jax.evaluation.features import WHICH
from cmid_jax.evaluation.finetune import FinetuneRecipe
from cmid_jax.evaluation.run import PROTOCOLS, evaluate

_DEFAULTS = FinetuneRecipe()
_WORKDIR = flags.DEFINE_string('workdir', None, 'Pretraining workdir (config.json + ckpt/).')
_DATA = flags.DEFINE_string(
    'data',
    None,
    'Labelled data: one sub-folder per class; for segmentation images/ + masks/ '
    '(+ classes.json); for change A/ + B/ + label/.',
)
_PROTOCOL = flags.DEFINE_enum('protocol', 'knn', PROTOCOLS, 'Evaluation protocol.')
_WHICH = flags.DEFINE_enum('which', 'student', WHICH, 'Backbone to evaluate.')
_TRAIN_FRACTION = flags.DEFINE_float(
    'train_fraction', 0.5, 'Train share: of each class, or of the split groups (dense).'
)
_SEED = flags.DEFINE_integer('seed', 0, 'Split (and fine-tune) seed.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
_EPOCHS = flags.DEFINE_integer('epochs', _DEFAULTS.epochs, 'finetune only.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', _DEFAULTS.batch_size, 'finetune only.')
_LR = flags.DEFINE_float('lr', _DEFAULTS.lr, 'finetune only: peak AdamW lr.')
_HEAD = flags.DEFINE_enum('head', 'linear', HEADS, 'segmentation / change only: the head.')
_SPLIT_GROUP = flags.DEFINE_string(
    'split_group',
    None,
    'segmentation / change only: regular expression whose first group in '
    "an image's name is its split unit (default: the name), e.g. '^(tile\\d+)_'.",
)
_SCALE = flags.DEFINE_float(
    'scale',
    1.0,
    'segmentation / change only: resize the images by '
    'this factor before the windows slide over them.',
)
flags.mark_flags_as_required(['workdir', 'data'])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    recipe = FinetuneRecipe(
        epochs=_EPOCHS.value, batch_size=_BATCH_SIZE.value, lr=_LR.value, seed=_SEED.value
    )
    with errors.expected(errors.DataError, "check --data (see the protocol's layout in --help)"):
        result = evaluate(
            _WORKDIR.value,
            _DATA.value,
            _PROTOCOL.value,
            which=_WHICH.value,
            train_fraction=_TRAIN_FRACTION.value,
            seed=_SEED.value,
            step=_STEP.value,
            finetune=recipe,
            head=_HEAD.value,
            split_group=_SPLIT_GROUP.value,
            scale=_SCALE.value,
        )
    print(json.dumps(result), flush=True)


def run() -> None:
    errors.run(main)


if __name__ == '__main__':
    run()
