"""Evaluates a pretrained backbone of a workdir on a labelled dataset (`cmid-evaluate`).

    cmid-evaluate --workdir=runs/vitb --data=AID --protocol=knn
    cmid-evaluate --workdir=runs/vitb --data=AID --protocol=linear --which=teacher
    cmid-evaluate --workdir=runs/vitb --data=AID --protocol=finetune --epochs=10

Prints one JSON line and appends it to `workdir/eval.jsonl`; see `cmid_jax.evaluation.run`.
"""

import json

from absl import app, flags

from cmid_jax import errors
from cmid_jax.evaluation.finetune import FinetuneRecipe
from cmid_jax.evaluation.run import PROTOCOLS, evaluate
from cmid_jax.evaluation.features import WHICH

_DEFAULTS = FinetuneRecipe()
_WORKDIR = flags.DEFINE_string('workdir', None, 'Pretraining workdir (config.json + ckpt/).')
_DATA = flags.DEFINE_string('data', None, 'Labelled data: one sub-folder per class.')
_PROTOCOL = flags.DEFINE_enum('protocol', 'knn', PROTOCOLS, 'Evaluation protocol.')
_WHICH = flags.DEFINE_enum('which', 'student', WHICH, 'Backbone to evaluate.')
_TRAIN_FRACTION = flags.DEFINE_float('train_fraction', 0.5, 'Per-class train share.')
_SEED = flags.DEFINE_integer('seed', 0, 'Split (and fine-tune) seed.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
_EPOCHS = flags.DEFINE_integer('epochs', _DEFAULTS.epochs, 'finetune only.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', _DEFAULTS.batch_size, 'finetune only.')
_LR = flags.DEFINE_float('lr', _DEFAULTS.lr, 'finetune only: peak AdamW lr.')
flags.mark_flags_as_required(['workdir', 'data'])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    recipe = FinetuneRecipe(epochs=_EPOCHS.value, batch_size=_BATCH_SIZE.value, lr=_LR.value,
                            seed=_SEED.value)
    with errors.expected(errors.DataError, 'check --data (one sub-folder per class)'):
        result = evaluate(_WORKDIR.value, _DATA.value, _PROTOCOL.value, which=_WHICH.value,
                          train_fraction=_TRAIN_FRACTION.value, seed=_SEED.value,
                          step=_STEP.value, finetune=recipe)
    print(json.dumps(result), flush=True)


def run() -> None:
    errors.run(main)


if __name__ == '__main__':
    run()
