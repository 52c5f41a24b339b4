"""CMID pretraining entry point.

  python -m cmid_jax.main --config=configs/vitb.py:demo --workdir=runs/demo

Running the same command again in the same workdir resumes from its latest checkpoint (a
finished run says so and exits 0). Exit status: 0 finished, 2 an expected error (one line and a
hint; `CMID_TRACEBACK=1` shows the traceback), 75 preempted by SIGTERM after saving (run the same
command again), 1 a bug. See `cmid_jax.errors`.
"""

from absl import app, flags
from ml_collections import config_flags

from cmid_jax import errors, parallel, train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    'workdir',
    None,
    'Directory for checkpoints and metrics (local, or gs://... / s3://... through etils.epath).',
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change',
    False,
    'Resume although fields that change the train state or its meaning differ from the '
    "workdir's config.json: the saved weights, optimizer state, queue, step and data position "
    'continue under the new values (recorded in history.jsonl).',
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    parallel.maybe_initialize_distributed()
    train.train_and_evaluate(
        _CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value
    )


def run() -> None:
    errors.run(main)


if __name__ == '__main__':
    run()
