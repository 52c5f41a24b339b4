"""CMID pretraining of ResNet-50 with the official recipe (BN in the local head).

    cmid-pretrain --config=configs/resnet50.py --workdir=runs/r50 --config.data.path=IMAGES

Expected result: the official CMID ResNet-50 (MillionAID, 200 epochs, 4 GPUs) reaches 99.22% OA
fine-tuned on UCM and 87.35 mIoU on Potsdam (docs/cmid-method.md 11.2); this port has not run
the full recipe yet. Time on a GPU: not measured (`experiments/benchmarks/run_gpu.sh`
measures it). Memory, traced on a CPU: 24 GiB of saved activations and state per device at
batch 256 with `model.remat='dots'` (README, "Memory and rematerialisation"). Per-device batch on
each of TPU v4 / v5e / v5p / v6e, H100, H200 and A100-80: README, "What fits where" (compiled by
`experiments/benchmarks/run_aot.sh`; on an H100, 256 per device compiles to 23.7 GiB without
remat, so 256 per device it is); the default `model.remat='auto'`
picks the lightest policy that fits the run's device at its batch.

Presets: `configs/resnet50.py:smoke` (a one-block-per-stage bottleneck ResNet 'nano', 64 px, 20
steps: loss finite and the run complete; about a minute on 2 CPU cores, most of it compiling) and
`configs/resnet50.py:demo` (the same network at 128 px on the bundled Landsat-8 tiles).
"""

from cmid_jax import config_base


def get_config(arg: str | None = None):
    c = config_base.default_config()
    c.model.arch = 'resnet'
    c.model.variant = '50'
    return config_base.apply_preset(c, arg, {'smoke': 'nano', 'demo': 'nano'})
