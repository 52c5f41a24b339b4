"""CMID pretraining of Swin-B (the official mmcls-style Swin) with the official recipe.

    cmid-pretrain --config=configs/swinb.py --workdir=runs/swinb --config.data.path=IMAGES

Expected result: the official CMID Swin-B (MillionAID, 200 epochs) reaches 99.48% OA fine-tuned
on UCM and 88.36 mIoU on Potsdam (docs/cmid-method.md 11.2); this port has not run the full
recipe yet. Time on a GPU: not measured (`experiments/benchmarks/run_gpu.sh`). Memory, traced on
a CPU: 39 GiB of saved activations and state per device at batch 256 with `model.remat='dots'`.
Per-device batch on each of TPU v4 / v5e / v5p / v6e, H100, H200 and A100-80: README, "What fits
where" (compiled by `experiments/benchmarks/run_aot.sh`; on an H100, 256 per device needs remat
'dots', 33.6 GiB, since 'none' peaks at 60.2 GiB); the default
`model.remat='auto'` picks the lightest policy that fits the run's device at its batch.

The local head has no BN for Swin (official `use_bn: False`: `HAS_BATCH_NORM` of
`cmid_jax/models/swin.py`). `cmid-export --layout=mmcls` writes the official / mmseg keys, the
default the timm layout (`swin_base_patch4_window7_224`).

Presets: `configs/swinb.py:smoke` (Swin 'nano': width 32, depths 1-1-2-1, window 2; 64 px, 20
steps: loss finite and the run complete, about a minute on 2 CPU cores) and `configs/swinb.py:demo`
(the same network at 128 px on the bundled Landsat-8 tiles). Window 7 would need 224 px (a
last-stage map of at least 7x7), about 10x the CPU cost per step.
"""

from cmid_jax import config_base


def get_config(arg: str | None = None):
    c = config_base.default_config()
    c.model.arch = 'swin'
    c.model.variant = 'B'
    return config_base.apply_preset(c, arg, {'smoke': 'nano', 'demo': 'nano'})
