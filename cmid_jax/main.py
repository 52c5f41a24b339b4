"""CMID pretraining entry point.

  python -m cmid_jax.main --config=configs/vitb.py:demo --workdir=runs/demo

Running the same command again in the same workdir resumes from its latest checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from cmid_jax import parallel, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(logging.logging.Filter):
    """Keeps orbax's per-save INFO chatter out of the progress log (warnings still pass)."""

    def filter(self, record):
        return record.levelno >= logging.logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    logging.get_absl_handler().addFilter(_QuietLibraries())
    parallel.maybe_initialize_distributed()
    logging.info('Config:\n%s', _CONFIG.value)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def run() -> None:
    app.run(main)


if __name__ == '__main__':
    run()
