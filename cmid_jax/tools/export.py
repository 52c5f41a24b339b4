"""Exports a workdir's backbone as a PyTorch state_dict plus JSON metadata (`cmid-export`).

    cmid-export --workdir=runs/r50 --out=r50_cmid.pth
    cmid-export --workdir=runs/vitb --step=2000 --which=teacher --out=vit.safetensors

See `cmid_jax.convert.weights` for the files written.
"""

from absl import app, flags

from cmid_jax import errors
from cmid_jax.convert import weights
from cmid_jax.models import layouts
from cmid_jax.models.cmid import STATE_KEYS

_WORKDIR = flags.DEFINE_string('workdir', None, 'cmid_jax workdir to export from.')
_OUT = flags.DEFINE_string('out', None, 'Output weights: .pth/.pt (needs torch) or .safetensors.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
_WHICH = flags.DEFINE_enum(
    'which', 'student', sorted(STATE_KEYS), 'student (deployed network) or teacher (EMA).'
)
_LAYOUT = flags.DEFINE_enum(
    'layout',
    None,
    list(layouts()),
    "PyTorch key layout (default: the arch's export layout; Swin: timm, or "
    'mmcls for the official CMID / mmseg keys).',
)
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    weights.export_backbone(
        _WORKDIR.value, _OUT.value, step=_STEP.value, which=_WHICH.value, layout=_LAYOUT.value
    )


def run() -> None:
    errors.run(main)


if __name__ == '__main__':
    run()
