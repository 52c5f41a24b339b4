"""Default CMID pretraining configuration shared by every file in `configs/`.

The values follow the official recipe (cmid-method.md, sections 3-8 and "Decisions for cmid_jax"):
batch 256, Adan with lr 4e-3 x batch/256, wd 0.02, 10 warm-up epochs, EMA 0.996 -> 1, queue 65,536,
InfoNCE temperature 0.2, 20 local matches, teacher temperature 0.04 -> 0.07 over 50 epochs.
Experiment files (`configs/vitb.py`, `configs/resnet50.py`) change the backbone and add presets.
"""

from __future__ import annotations

import ml_collections

# Per-channel RS statistics of the official pretraining data (0-1 scale), cmid-method.md section 3.
RS_MEAN = (0.33797, 0.3605, 0.3348)
RS_STD = (0.1359, 0.1352, 0.1407)


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # Model init, data order and augmentations.
    c.batch_size = 256  # Global batch of source images (each gives two crops).
    c.total_steps = ml_collections.config_dict.placeholder(int)  # None = epochs * steps_per_epoch.
    c.epochs = 200  # Run length when total_steps is None (official: 200 on MillionAID).
    # Epochs drive the lr warm-up and the teacher-temperature schedule. None = images // batch_size.
    c.steps_per_epoch = ml_collections.config_dict.placeholder(int)

    # Sources, bands and value scale: cmid_jax/data/sources.py and cmid_jax/data/bands.py.
    c.data = ml_collections.ConfigDict()
    # None = the demo tiles in the package.
    c.data.path = ml_collections.config_dict.placeholder(str)
    # None = data.path: a folder of images / scenes, or ArrayRecord shards from cmid-prepare
    # (found by their manifest.json). 'tfds:NAME[/CONFIG]:SPLIT' = a TFDS dataset prepared in the
    # array_record format, with data.path as its data_dir (None = TFDS's default).
    c.data.source = ml_collections.config_dict.placeholder(str)
    # 0 = whole images. N > 0 = cut every scene under data.path into a grid of NxN windows read
    # on the fly (windowed GeoTIFF reads); needs N >= image_size, and N = image_size keeps the
    # native resolution (larger tiles are resized to image_size, like whole images).
    c.data.tile_size = 0
    c.data.max_nodata = 0.25  # Tiles or images with a larger nodata-pixel fraction are replaced.
    # None = 8-bit RGB (first 3 bands; non-uint8 data stretched per image). A tuple of 0-based
    # band indices or band names, e.g. (3, 2, 1, 7) or ('red', 'green', 'blue'), reads those
    # bands with their raw uint8 / uint16 values; the model's input channels follow.
    c.data.bands = ml_collections.config_dict.placeholder(tuple)
    c.data.image_size = 224  # Crop side in pixels; a multiple of mask.patch_size.
    # Per band, in units of value / type maximum (uint8: /255, uint16: /65535), the scale the
    # device divides by before normalising. data.stats (JSON from cmid-data-stats) replaces
    # both.
    c.data.mean = RS_MEAN
    c.data.std = RS_STD  # Per band, same units as data.mean.
    c.data.stats = ml_collections.config_dict.placeholder(str)  # JSON from cmid-data-stats.
    # (black, white) raw values for noise and solarize; None = from data.stats, else 0 and the
    # type maximum (255: the official 8-bit augmentations).
    c.data.value_range = ml_collections.config_dict.placeholder(tuple)
    c.data.rgb = ml_collections.config_dict.placeholder(bool)  # Colour ops; None = iff 3 bands.
    c.data.dtype = ml_collections.config_dict.placeholder(str)  # Set from the data: uint8/uint16.
    c.data.num_workers = 2  # grain worker processes per host; 0 decodes in the main process.

    c.mask = ml_collections.ConfigDict()
    c.mask.patch_size = 32  # Block size in pixels; equals the stride of the last backbone stage.
    c.mask.ratio = 0.6  # ceil(49 * 0.6) = 30 of 49 blocks at 224 px.

    c.model = ml_collections.ConfigDict()
    c.model.arch = 'vit'  # 'vit', 'resnet' or 'swin' (cmid_jax.models.BACKBONES).
    # Each arch's VARIANTS: vit B/16, S/16, Ti/16 and the small mu/16; resnet 50 and the small
    # tiny, nano; swin B and the small tiny-test, nano (small: tests, CPU smoke and demo runs).
    c.model.variant = 'B/16'
    # ViT attention: 'auto' = cuDNN fused attention on NVIDIA GPUs (bf16/fp16), XLA elsewhere;
    # 'xla' or 'cudnn' force one ('cudnn' where it cannot run is an error before compiling).
    c.model.attention_impl = 'auto'
    # What each backbone block keeps for the backward pass: 'none' (all), 'dots' (matmul and conv
    # outputs; recomputes norms, activations and attention) or 'full' (block inputs only).
    c.model.remat = 'dots'
    # Activations; params, optimizer, teacher and losses stay float32.
    c.model.compute_dtype = 'bfloat16'
    c.model.proj_hidden_dim = 2048  # Global projector C-2048-256 (no BN).
    c.model.proj_dim = 256  # Width of the InfoNCE embeddings and queue keys.
    c.model.local_hidden_dim = 2048  # Local head C-2048-2048-256, then the prototypes.
    c.model.local_bottleneck_dim = 256  # L2-normalised bottleneck before the prototypes.
    c.model.local_prototypes = 2048  # Weight-normed prototypes (DINO output width).
    c.model.local_use_bn = ml_collections.config_dict.placeholder(bool)  # None = BN for CNNs only.

    c.loss = ml_collections.ConfigDict()
    c.loss.use_mim = True  # Each term can be switched off for ablations.
    c.loss.use_global = True  # MoCo InfoNCE against the queue.
    c.loss.use_local = True  # DINO cross-entropy on matched grid cells.
    c.loss.temperature = 0.2  # InfoNCE temperature.
    c.loss.queue_size = 65536  # Negative keys, shared by all devices and hosts.
    c.loss.num_matches = 20  # Best nearest-neighbour matched cells per crop pair (of grid^2).
    c.loss.student_temp = 0.1  # Local-loss student temperature.
    c.loss.teacher_temp_warmup = 0.04  # Teacher temperature at epoch 0 ...
    c.loss.teacher_temp = 0.07  # ... and after the warm-up.
    c.loss.teacher_temp_warmup_epochs = 50  # Linear teacher-temperature warm-up, in epochs.
    c.loss.center_momentum = 0.9  # EMA of the teacher-output centre.

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 4e-3  # Scaled by batch_size / 256.
    c.optim.min_lr = 1e-6  # End of the per-step cosine.
    c.optim.weight_decay = 0.02  # Adan decoupled decay, on tensors with ndim > 1 only.
    c.optim.warmup_epochs = 10  # Linear lr warm-up ...
    c.optim.warmup_factor = 0.01  # ... from this fraction of the lr.
    c.optim.ema_momentum = 0.996  # Teacher EMA momentum at step 0 (cosine to 1).

    # Online kNN evaluation during pretraining on a labelled class-per-folder dataset.
    c.eval = ml_collections.ConfigDict()
    c.eval.path = ml_collections.config_dict.placeholder(str)  # None = no online evaluation.
    c.eval.every_steps = 1000  # Online kNN interval.
    c.eval.k = 20  # Neighbours that vote.
    c.eval.temperature = 0.07  # Votes weighted by exp(cosine / temperature).
    c.eval.train_fraction = 0.5  # Seeded per-class split of eval.path.
    c.eval.batch_size = 128  # Feature-extraction batch.
    # None = no online dense probe. A segmentation folder (images/, masks/) or a change folder
    # (A/, B/, label/): the linear probe of cmid-evaluate on the student, every eval.every_steps.
    c.eval.dense_path = ml_collections.config_dict.placeholder(str)
    # Regex whose first group names an image's split unit (e.g. '^(tile\d+)_'); None = its name.
    c.eval.dense_split_group = ml_collections.config_dict.placeholder(str)

    # Steps with a non-finite loss or gradient are never applied; more than this many stop the run.
    c.max_nonfinite_steps = 0

    c.log_every_steps = 50  # Metrics and the progress line.
    c.images_every_steps = 1000  # Reconstruction grids (input, mask, prediction, target).
    c.checkpoint_every_steps = 1000  # Async orbax saves; the last step is always saved.
    c.keep_checkpoints = 3  # Older checkpoints are deleted.
    return c


def smoke_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a config so a whole run takes seconds to minutes on a 2-core CPU."""
    c.batch_size = 8
    c.total_steps = 20
    c.steps_per_epoch = 4
    c.data.image_size = 64
    c.data.num_workers = 0
    c.model.compute_dtype = 'float32'
    c.model.remat = 'none'  # Tiny models: memory is no concern, recomputation only costs time.
    c.model.proj_hidden_dim = 64
    c.model.proj_dim = 32
    c.model.local_hidden_dim = 64
    c.model.local_bottleneck_dim = 32
    c.model.local_prototypes = 64
    c.loss.queue_size = 64
    c.loss.num_matches = 2  # 4 positions on the 2x2 grid of a 64-px crop.
    c.loss.teacher_temp_warmup_epochs = 2
    c.optim.warmup_epochs = 1
    c.log_every_steps = 5
    c.checkpoint_every_steps = 10
    return c


def demo_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """About a minute on 2 CPU cores, compile included, on the Landsat-8 tiles in the package.

    Sized for the time, not for accuracy: the smoke networks at 128 px (a 4x4 mask grid, 10
    blocks masked), a 4e-3 learning rate (the recipe's scaling, 4e-3 x 16 / 256 = 2.5e-4, left the
    decoder's initial noise in the masked blocks of the reconstructions) and a 256-key queue that
    fills with real keys within 8 steps.
    """
    smoke_overrides(c)
    c.batch_size = 16
    c.total_steps = 120
    c.steps_per_epoch = 10
    c.data.image_size = 128
    c.data.num_workers = 1
    c.optim.base_lr = 0.064  # x 16 / 256 = 4e-3.
    c.model.proj_hidden_dim = 256
    c.model.proj_dim = 64
    c.model.local_hidden_dim = 256
    c.model.local_bottleneck_dim = 64
    c.model.local_prototypes = 256
    c.loss.queue_size = 256
    c.loss.num_matches = 7  # 20 of 49 at 224 px scales to 7 of 16 at 128 px.
    c.log_every_steps = 10
    c.checkpoint_every_steps = 60
    return c


def apply_preset(
    c: ml_collections.ConfigDict, arg: str | None, variants: dict[str, str]
) -> ml_collections.ConfigDict:
    """Applies the `get_config(arg)` preset named by `arg` ('' / None, 'smoke' or 'demo').

    `variants` maps each preset to the small backbone variant it uses.
    """
    if not arg:
        return c
    presets = {'smoke': smoke_overrides, 'demo': demo_overrides}
    if arg not in presets:
        raise ValueError(f'Unknown config preset {arg!r}; expected one of {sorted(presets)}.')
    presets[arg](c)
    c.model.variant = variants[arg]
    return c
