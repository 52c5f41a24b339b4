"""CMID pretraining of ResNet-50 with the official recipe (BN in the local head).

    python -m cmid_jax.main --config=configs/resnet50.py --workdir=runs/r50 --config.data.path=IMAGES

Presets: `configs/resnet50.py:smoke` (a one-block-per-stage bottleneck ResNet, 64 px, 20 steps)
and `configs/resnet50.py:demo` (the same network at 128 px on the bundled Landsat-8 tiles).
"""

from cmid_jax import config_base


def get_config(arg: str | None = None):
    c = config_base.default_config()
    c.model.arch = 'resnet'
    c.model.variant = '50'
    return config_base.apply_preset(c, arg, {'smoke': 'nano', 'demo': 'nano'})
