"""CMID pretraining of ViT-B/16 with the official recipe.

    python -m cmid_jax.main --config=configs/vitb.py --workdir=runs/vitb --config.data.path=IMAGES

Per-device batch: on an H100 the recipe's 256 per device runs with `model.remat='none'` (compiled
peak 40.2 GiB with cuDNN attention; up to 360 fit, 768 with 'dots'), which the default 'auto'
picks; TPU v4 / v5e / v5p / v6e, H200 and A100-80: README, "What fits where" (compiled by
`experiments/benchmarks/run_aot.sh`, still to be run there).

Presets: `configs/vitb.py:smoke` (ViT-mu, 64 px, 20 steps, seconds on a CPU) and
`configs/vitb.py:demo` (ViT-mu, 128 px, 120 steps on the bundled Landsat-8 tiles, about a minute on
2 CPU cores; ViT-Ti/16 would take 7x as long per step).
"""

from cmid_jax import config_base


def get_config(arg: str | None = None):
    c = config_base.default_config()
    c.model.arch = 'vit'
    c.model.variant = 'B/16'
    return config_base.apply_preset(c, arg, {'smoke': 'mu/16', 'demo': 'mu/16'})
