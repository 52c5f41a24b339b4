"""CMID ablation at equal budget: which of the three losses carry the representation?

Settings (`get_config('ARCH,SETTING')`): `full` (MIM + global + local), `no_mim` (contrastive
global + local, no MIM), `mim_only`, `no_local` (MIM + global, without the local branch), and
`random` (no pretraining: 0 steps, the initial weights are saved for evaluation). ARCH is
`resnet` (ResNet-50) or `vit` (ViT-S/16).

GPU recipe (full AID, 10,000 images at 224 px, labels ignored; 100 epochs of batch 256):

  cmid-pretrain --config=configs/ablation.py:vit,full --workdir=runs/ablation/vit_full \
      --config.data.path=/path/to/AID
  cmid-evaluate --workdir=runs/ablation/vit_full --data=/path/to/AID --protocol=knn
  DATA=/path/to/dense_data bash experiments/ablation/run_dense.sh runs/ablation/vit_full  # dense probes

CPU recipe (`ARCH,SETTING,cpu`): the small variants at 64 px for 600 steps of batch 32 (more
with --config.total_steps), on the 1,200-image AID subset or the full AID, a few minutes per run
on 2 cores; see experiments/ablation/README.md. Expected on the full AID with 1,500 steps
(`AID=data/AID STEPS=1500 bash experiments/ablation/run_cpu.sh`), kNN / linear top-1 of full CMID:
35.1 / 44.9% (ResNet nano) and 30.2 / 34.0% (ViT mu/16), mean of 3 seeds, about 1 point above
no-MIM and far above MIM only and random init.
"""

from cmid_jax import config_base

SETTINGS = {
    'full': dict(use_mim=True, use_global=True, use_local=True),
    'no_mim': dict(use_mim=False, use_global=True, use_local=True),
    'mim_only': dict(use_mim=True, use_global=False, use_local=False),
    'no_local': dict(use_mim=True, use_global=True, use_local=False),
    'random': dict(use_mim=True, use_global=True, use_local=True),
}
VARIANTS = {'resnet': ('50', 'nano'), 'vit': ('S/16', 'mu/16')}


def get_config(arg: str = 'resnet,full'):
    arch, setting, *scale = arg.split(',')
    if arch not in VARIANTS or setting not in SETTINGS or scale not in ([], ['cpu']):
        raise ValueError(
            f'Unknown ablation {arg!r}; expected ARCH,SETTING[,cpu] with ARCH in '
            f'{sorted(VARIANTS)} and SETTING in {sorted(SETTINGS)}.'
        )
    c = config_base.default_config()
    c.model.arch = arch
    c.model.variant = VARIANTS[arch][0]
    c.epochs = 100
    if scale:
        config_base.smoke_overrides(c)
        c.model.variant = VARIANTS[arch][1]
        c.batch_size = 32
        c.total_steps = 600
        # Schedule epochs of 37 steps (1,200 images / 32) on any data, so that runs on the subset
        # and on the full AID follow the same lr, EMA and temperature schedules.
        c.steps_per_epoch = 37
        c.data.num_workers = 2
        c.loss.queue_size = 1024
        c.optim.base_lr = 0.05  # Small-batch runs need a larger lr than 4e-3 x 32/256.
        c.log_every_steps = 50
        c.checkpoint_every_steps = 600
    for key, value in SETTINGS[setting].items():
        c.loss[key] = value
    if setting == 'random':
        c.total_steps = 0
    return c
