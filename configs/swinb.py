"""CMID pretraining of Swin-B (the official mmcls-style Swin) with the official recipe.

    python -m cmid_jax.main --config=configs/swinb.py --workdir=runs/swinb --config.data.path=IMAGES

The local head has no BN for Swin (official `use_bn: False`; `model.local_use_bn=None` already means
BN only for ResNets). Export the student backbone with `cmid_jax.models.swin.to_torch_state_dict`,
in the official 'mmcls' layout or the 'timm' layout (`swin_base_patch4_window7_224`).

Presets: `configs/swinb.py:smoke` (Swin 'nano': width 32, depths 1-1-2-1, window 2; 64 px, 20
steps) and `configs/swinb.py:demo` (the same network at 128 px on the bundled Landsat-8 tiles).
Window 7 would need 224 px (a last-stage map of at least 7x7), about 10x the CPU cost per step.
"""

from cmid_jax import config_base


def get_config(arg: str | None = None):
    c = config_base.default_config()
    c.model.arch = 'swin'
    c.model.variant = 'B'
    return config_base.apply_preset(c, arg, {'smoke': 'nano', 'demo': 'nano'})
