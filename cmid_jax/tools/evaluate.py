r"""Evaluates a pretrained backbone of a workdir on a labelled dataset (`cmid-evaluate`).

    cmid-evaluate --workdir=runs/vitb --data=AID --protocol=knn
    cmid-evaluate --workdir=runs/vitb --data=AID --protocol=linear --which=teacher
    cmid-evaluate --workdir=runs/vitb --data=AID --protocol=finetune --epochs=10
    cmid-evaluate --workdir=runs/vitb --data=dubai-seg --protocol=segmentation \
        --split_group='^(tile\d+)_'
    cmid-evaluate --workdir=runs/vitb --data=levir-cd --protocol=change --head=fpn

Prints one JSON line and appends it to `workdir/eval.jsonl`; see `cmid_jax.evaluation.run`.
The flags after `--step` are the protocols' own options (`cmid_jax.evaluation.protocols`), one
flag per option name; giving one that the chosen protocol does not take is an error.
Data that cannot be evaluated (a missing or misfit file, a bad value) ends the program with one
line naming it, without a traceback.
"""

import json

from absl import app, flags

from cmid_jax import errors
from cmid_jax.evaluation import protocols
from cmid_jax.evaluation.features import WHICH
from cmid_jax.evaluation.run import evaluate

_DEFINE = {
    bool: flags.DEFINE_boolean,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    str: flags.DEFINE_string,
}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The common flags, then one per protocol option (`protocols.option_specs`): its name, type,
    default and help, the help led by the protocols it belongs to."""
    define = dict(flag_values=flag_values)
    flags.DEFINE_string('workdir', None, 'Pretraining workdir (config.json + ckpt/).', **define)
    flags.DEFINE_string(
        'data',
        None,
        'Labelled data: one sub-folder per class; for segmentation images/ + masks/ '
        '(+ classes.json); for change A/ + B/ + label/.',
        **define,
    )
    flags.DEFINE_enum(
        'protocol', 'knn', list(protocols.PROTOCOLS), 'Evaluation protocol.', **define
    )
    flags.DEFINE_enum('which', 'student', WHICH, 'Backbone to evaluate.', **define)
    flags.DEFINE_float(
        'train_fraction',
        0.5,
        'Train share: of each class, or of the split groups (dense).',
        **define,
    )
    flags.DEFINE_integer('seed', 0, 'Split (and fine-tune) seed.', **define)
    flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).', **define)
    for spec in protocols.option_specs().values():
        text = f'{" / ".join(spec.protocols)} only: {spec.help}'
        if spec.choices is not None:
            flags.DEFINE_enum(spec.name, spec.default, spec.choices, text, **define)
        else:
            _DEFINE[spec.type](spec.name, spec.default, text, **define)
    flags.mark_flags_as_required(['workdir', 'data'], flag_values=flag_values)


def chosen_options(flag_values: flags.FlagValues = flags.FLAGS) -> dict:
    """The chosen protocol's options from the flags; a flag of another protocol's option given
    on the command line is an error (it would do nothing)."""
    protocol = flag_values.protocol
    specs = protocols.option_specs()
    given = {name for name in specs if flag_values[name].present}
    try:
        protocols.make_options(protocol, **{name: flag_values[name].value for name in given})
    except ValueError as e:
        raise errors.UserError(str(e), 'pass --helpshort to list the flags') from None
    return {
        name: flag_values[name].value for name, spec in specs.items() if protocol in spec.protocols
    }


define_flags()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    options = chosen_options()
    f = flags.FLAGS
    with errors.hint("check --data (see the protocol's layout in --help)"):
        result = evaluate(
            f.workdir,
            f.data,
            f.protocol,
            which=f.which,
            train_fraction=f.train_fraction,
            seed=f.seed,
            step=f.step,
            **options,
        )
    print(json.dumps(result), flush=True)


def run() -> None:
    errors.run(main)


if __name__ == '__main__':
    run()
