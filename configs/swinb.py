"""CMID pretraining of Swin-B (official mmcls-style Swin) with the official recipe.

    python -m cmid_jax.main --config=configs/swinb.py --workdir=runs/swinb --config.data.path=IMAGES

The local head has no BN for Swin (official `use_bn: False`; `model.local_use_bn=None` already means
BN only for ResNets). Export the student backbone with `cmid_jax.models.swin.to_torch_state_dict`
in the official 'mmcls' layout or the 'timm' layout (`swin_base_patch4_window7_224`).

Presets: `configs/swinb.py:smoke` (Swin 'tiny-test', 20 steps) and `configs/swinb.py:demo` (the
same network, 60 steps on the bundled Landsat-8 tiles). Both run at 224 px, not the 64 / 128 px of
the other presets: window 7 needs a last-stage map of at least 7x7 (mmcls `pad_small_map=False`).
"""

from cmid_jax import config_base


def get_config(arg: str | None = None):
    c = config_base.default_config()
    c.model.arch = 'swin'
    c.model.variant = 'B'
    c = config_base.apply_preset(c, arg, {'smoke': 'tiny-test', 'demo': 'tiny-test'})
    if arg:
        c.data.image_size = 224
        c.loss.num_matches = 20  # The official 20 of the 49 positions of the 7x7 grid.
    return c
