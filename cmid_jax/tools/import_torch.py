"""Imports an official CMID PyTorch checkpoint into a cmid_jax workdir (`cmid-import-torch`).

    cmid-import-torch --checkpoint=CMID_R50_200ep.pth --config=configs/resnet50.py \
        --workdir=runs/r50_continued
    cmid-pretrain --config=configs/resnet50.py --workdir=runs/r50_continued

See `cmid_jax.convert.import_torch` for what is read and checked.
"""

from absl import app, flags
from ml_collections import config_flags

from cmid_jax import errors
from cmid_jax.convert.import_torch import import_checkpoint

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'cmid_jax config describing the checkpoint.', lock_config=True
)
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Official CMID .pth/.pt/.safetensors file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir to create (resume it with cmid-pretrain).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace checkpoints already in the workdir.')
flags.mark_flags_as_required(['config', 'checkpoint', 'workdir'])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    with errors.hint('the config must describe the checkpoint'):
        import_checkpoint(
            _CHECKPOINT.value, _CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value
        )


def run() -> None:
    errors.run(main)


if __name__ == '__main__':
    run()
