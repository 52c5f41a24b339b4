"""PyTorch reference of the full CMID train step, to compare throughput with `cmid_jax.perf.throughput`.

    python experiments/benchmarks/torch_reference.py --arch vit_base --amp bf16 --compile
    python experiments/benchmarks/torch_reference.py --arch resnet50 --amp bf16 --compile \\
        --channels-last
    python experiments/benchmarks/torch_reference.py --arch swin_base --amp bf16 --compile
    python experiments/benchmarks/torch_reference.py --arch vit_tiny --image-size 64 \\
        --batch-size 4 --steps 2 --device cpu   # CPU smoke

One step is the step of `cmid_jax.step.TrainStep` (official `MoCoBasedDDP.forward`,
cmid-method.md sections 5-7): the student (timm backbone + additive mask token: ViT on the masked
patch embeddings before the position embedding, ResNet on the stride-4 stem output, Swin on the
normed stride-4 patch embeddings) runs forward and backward on the two masked crops, the teacher
(EMA copy, train-mode BN, no mask token) runs forward under no_grad on the two unmasked crops; MIM
decoder (1x1 conv + PixelShuffle) with focal-L1 + focal frequency loss, projector + InfoNCE against
a 65,536-key queue, local head (3-layer Conv1d, weight-normed prototypes, BN for ResNet) on the
matched positions with DINO cross-entropy and centring; timm Adan (prox weight decay, as the
official code); EMA of the teacher's backbone, projector and local head; enqueue of both teacher
keys. Sizes and constants come from `cmid_jax.config_base.default_config()`. Losses run in float32
outside autocast, as in cmid_jax (D4). The batch is synthetic, device-resident and reused (uint8,
normalised on device). Crop B's photometric chain and the block masks are the official data
loader's work (CPU worker processes), so they are not part of this step; `cmid_jax.perf.throughput` times
them inside its step.

Prints one JSON line with the fields of `python -m cmid_jax.tools.benchmark` (see README.md here).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

# Runs as a plain script: the recipe, the synthetic batch and the analytic FLOPs come from
# cmid_jax, and the modules used here need numpy and ml_collections only, not jax.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import timm  # noqa: E402
import timm.optim  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cmid_jax import config_base, flop_counts  # noqa: E402
from cmid_jax.perf import flops  # noqa: E402
from cmid_jax.perf.synthetic import synthetic_batch  # noqa: E402

# --arch -> (timm model, cmid_jax arch, cmid_jax variant).
ARCHS = {
    'vit_base': ('vit_base_patch16_224', 'vit', 'B/16'),
    'vit_small': ('vit_small_patch16_224', 'vit', 'S/16'),
    'vit_tiny': ('vit_tiny_patch16_224', 'vit', 'Ti/16'),
    'resnet50': ('resnet50', 'resnet', '50'),
    'swin_base': ('swin_base_patch4_window7_224', 'swin', 'B'),
}
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}
MASK_PATCH = 32  # Mask block size in pixels = stride of the last stage.


def upsample(mask: torch.Tensor, size: int) -> torch.Tensor:
    """(B, g, g) block mask -> (B, size, size) float mask by nearest repetition."""
    r = size // mask.shape[-1]
    return mask.float().repeat_interleave(r, 1).repeat_interleave(r, 2)


# --- networks -------------------------------------------------------------------------------------


def attention_impl(attn: nn.Module) -> str:
    """The path a timm attention module takes: PyTorch SDPA (fused kernels) or its own softmax."""
    return 'sdpa' if attn.fused_attn else 'eager'


class MaskedViT(nn.Module):
    """timm ViT returning its final-norm patch tokens as an NCHW map (cls token dropped)."""

    def __init__(self, name: str, image_size: int):
        super().__init__()
        self.net = timm.create_model(
            name, pretrained=False, num_classes=0, global_pool='', img_size=image_size
        )
        self.stride = self.net.patch_embed.patch_size[0]
        self.num_features = self.net.embed_dim
        self.token_width = self.net.embed_dim
        self.attention_impl = attention_impl(self.net.blocks[0].attn)

    def forward(self, x, mask=None, token=None):
        v, b, g = self.net, x.shape[0], x.shape[-1] // self.stride
        x = v.patch_embed(x)  # (B, N, D)
        if mask is not None:  # D2: the token is added to masked patch embeddings before pos-embed.
            x = x + token.to(x.dtype) * upsample(mask, g).flatten(1)[..., None].to(x.dtype)
        x = v.norm(v.blocks(v.norm_pre(v.patch_drop(v._pos_embed(x)))))
        return x[:, v.num_prefix_tokens :].transpose(1, 2).reshape(b, -1, g, g)

    def flops(self, image_size: int) -> flops.Backbone:
        v = self.net
        return flops.Backbone(
            flop_counts.vit_forward(
                image_size=image_size,
                patch_size=self.stride,
                embed_dim=v.embed_dim,
                depth=len(v.blocks),
                mlp_ratio=v.blocks[0].mlp.fc1.out_features / v.embed_dim,
            ),
            self.num_features,
            self.stride,
        )


class MaskedResNet(nn.Module):
    """timm ResNet returning the layer4 map; the mask token is added after the stride-4 stem."""

    def __init__(self, name: str, image_size: int):
        super().__init__()
        del image_size
        self.net = timm.create_model(name, pretrained=False, num_classes=0, global_pool='')
        self.stride = 32
        self.num_features = self.net.num_features
        self.token_width = self.net.conv1.out_channels
        self.attention_impl = None

    def forward(self, x, mask=None, token=None):
        n = self.net
        x = n.maxpool(n.act1(n.bn1(n.conv1(x))))
        if mask is not None:  # Official MaskResNet: add the token at masked stride-4 positions.
            m = upsample(mask, x.shape[-1])[:, None].to(x.dtype)
            x = x + token.to(x.dtype).view(1, -1, 1, 1) * m
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    def flops(self, image_size: int) -> flops.Backbone:
        n = self.net
        stages = [len(getattr(n, f'layer{i}')) for i in range(1, 5)]
        return flops.Backbone(
            flop_counts.resnet_forward(
                image_size=image_size, stage_sizes=stages, width=n.conv1.out_channels
            ),
            self.num_features,
            self.stride,
        )


class MaskedSwin(nn.Module):
    """timm Swin returning its final-norm last stage as an NCHW map.

    The mask token is added after the patch-embedding norm (official MaskSwin, as cmid_jax's Swin).
    """

    def __init__(self, name: str, image_size: int):
        super().__init__()
        # timm's Swin defaults to drop path 0.1; CMID pretrains without.
        self.net = timm.create_model(
            name,
            pretrained=False,
            num_classes=0,
            global_pool='',
            img_size=image_size,
            drop_path_rate=0.0,
        )
        n = self.net
        self.patch_size = n.patch_embed.patch_size[0]
        self.window_size = n.layers[0].blocks[0].window_size[0]
        self.stride = self.patch_size * 2 ** (len(n.layers) - 1)
        # Below this timm shrinks the last stages' windows to the map, where cmid_jax (mmcls
        # pad_small_map=False) refuses: the step and its FLOPs would differ.
        if image_size < self.stride * self.window_size:
            raise ValueError(
                f'Swin needs --image-size >= {self.stride * self.window_size} '
                f'(window {self.window_size} on the last stage)'
            )
        self.num_features = n.num_features
        self.token_width = n.embed_dim
        self.attention_impl = attention_impl(n.layers[0].blocks[0].attn)

    def forward(self, x, mask=None, token=None):
        n = self.net
        x = n.patch_embed(x)  # (B, H/4, W/4, C): timm's Swin runs NHWC.
        if mask is not None:
            x = x + token.to(x.dtype) * upsample(mask, x.shape[1])[..., None].to(x.dtype)
        return n.norm(n.layers(x)).permute(0, 3, 1, 2)

    def flops(self, image_size: int) -> flops.Backbone:
        n = self.net
        return flops.Backbone(
            flop_counts.swin_forward(
                image_size=image_size,
                patch_size=self.patch_size,
                embed_dim=n.embed_dim,
                depths=[len(s.blocks) for s in n.layers],
                window_size=self.window_size,
                mlp_ratio=n.layers[0].blocks[0].mlp.fc1.out_features / n.embed_dim,
            ),
            self.num_features,
            self.stride,
        )


BACKBONES = {'vit': MaskedViT, 'resnet': MaskedResNet, 'swin': MaskedSwin}


class Projector(nn.Module):
    """Linear - ReLU - Linear (no BN), L2-normalised in float32."""

    def __init__(self, c: int, hidden: int, out: int):
        super().__init__()
        self.layer = nn.Sequential(
            nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)
        )

    def forward(self, x):
        return F.normalize(self.layer(x).float(), dim=-1)


class LocalHead(nn.Module):
    """Conv1d(k=1) MLP to a bottleneck, L2 norm, then weight-normed prototypes with g fixed to 1."""

    def __init__(self, c: int, hidden: int, bottleneck: int, prototypes: int, use_bn: bool):
        super().__init__()
        layers, c_in = [], c
        for _ in range(2):
            norm = nn.BatchNorm1d(hidden) if use_bn else nn.Identity()
            layers += [nn.Conv1d(c_in, hidden, 1), norm, nn.GELU()]
            c_in = hidden
        self.mlp = nn.Sequential(*layers, nn.Conv1d(hidden, bottleneck, 1))
        last = nn.Conv1d(bottleneck, prototypes, 1, bias=False)  # For torch's default init only.
        self.prototypes = nn.Parameter(last.weight.detach().clone())

    def forward(self, x):  # (B, C, n) -> (B, prototypes, n), float32.
        x = F.normalize(self.mlp(x).float(), dim=1)
        # weight_norm(g=1) = each prototype's unit-norm direction.
        return F.conv1d(x, F.normalize(self.prototypes.float(), dim=(1, 2)))


class Student(nn.Module):
    def __init__(self, backbone: nn.Module, config):
        super().__init__()
        m, c = config.model, backbone.num_features
        self.backbone = backbone
        self.projector = Projector(c, m.proj_hidden_dim, m.proj_dim)
        self.local_head = LocalHead(
            c,
            m.local_hidden_dim,
            m.local_bottleneck_dim,
            m.local_prototypes,
            use_bn=m.arch == 'resnet',
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(c, backbone.stride**2 * 3, 1), nn.PixelShuffle(backbone.stride)
        )
        self.mask_token = nn.Parameter(torch.zeros(backbone.token_width))


class Teacher(nn.Module):
    """EMA copy of the student's backbone, projector and local head (no mask token, no decoder)."""

    def __init__(self, student: Student):
        super().__init__()
        self.backbone = copy.deepcopy(student.backbone)
        self.projector = copy.deepcopy(student.projector)
        self.local_head = copy.deepcopy(student.local_head)
        self.requires_grad_(False)


# --- losses (float32, ports of cmid_jax.losses) ---------------------------------------------------


def mim_loss(pred, target, pixel_mask):
    """Focal L1 on masked pixels + focal frequency loss ('mixed' replacement of visible pixels)."""
    m = pixel_mask[:, None]
    d = (pred - target).abs()
    spatial = (d * (2 * torch.sigmoid(0.2 * d) - 1) * m).sum() / (m.sum() + 1e-5) / pred.shape[1]
    x_rep = 0.5 * pred.detach() + 0.5 * target
    mask_f = m + (1 - m) * 0.001
    x_tilde = pred * mask_f + x_rep * (1 - mask_f)
    # ave_spectrum: the batch-mean spectrum is the spectrum of the batch mean (one FFT, as in
    # cmid_jax).
    spec = torch.fft.fft2((x_tilde - target).mean(0), norm='ortho')
    dist = spec.real**2 + spec.imag**2
    w = torch.log(dist.detach().sqrt() + 1)
    w = torch.nan_to_num(w / w.max(), nan=0.0).clamp(0, 1)
    return spatial + (w * dist).mean()


def infonce_loss(q, k, queue, temperature):
    logits = torch.cat([(q * k).sum(-1, keepdim=True), q @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def match_positions(loc_s, loc_t, num_matches):
    """Nearest teacher cell per student cell; keep the closest `num_matches`, in index order."""
    ls, lt = loc_s.flatten(1, 2), loc_t.flatten(1, 2)
    nn_dist, nn_idx = ((ls[:, :, None] - lt[:, None]) ** 2).sum(-1).min(-1)
    idx_s = torch.argsort(nn_dist, dim=-1, stable=True)[:, :num_matches].sort(-1).values
    return idx_s, nn_idx.gather(1, idx_s)


def gather_positions(fmap, grid, idx):
    """(B, C, h, w) map average-pooled to grid x grid, then (B, C, n) at flat positions idx."""
    x = F.avg_pool2d(fmap, fmap.shape[-1] // grid).flatten(2)
    return x.gather(2, idx[:, None].expand(-1, x.shape[1], -1))


def dino_local_loss(s, t, center, student_temp, teacher_temp):
    t_prob = F.softmax((t - center[:, None]) / teacher_temp, dim=1)
    return -(t_prob * F.log_softmax(s / student_temp, dim=1)).sum(1).mean()


def cmid_loss(student, teacher, queue, center, views, config, teacher_temp, device_type):
    """(total, keys to enqueue, new centre); autocast for the networks, float32 for the losses."""
    loss_cfg, grid = config.loss, config.data.image_size // MASK_PATCH
    fp32 = lambda: torch.autocast(device_type, enabled=False)
    s_map = {
        v: student.backbone(views[v]['masked'], views[v]['block_mask'], student.mask_token)
        for v in 'ab'
    }
    with torch.no_grad():
        t_map = {v: teacher.backbone(views[v]['target']) for v in 'ab'}

    rec = {v: student.decoder(s_map[v]) for v in 'ab'}
    with fp32():
        mim = (
            sum(mim_loss(rec[v].float(), views[v]['target'], views[v]['pixel_mask']) for v in 'ab')
            / 2
        )

    q = {v: student.projector(s_map[v].float().mean((2, 3))) for v in 'ab'}
    with torch.no_grad():
        k = {v: teacher.projector(t_map[v].float().mean((2, 3))) for v in 'ab'}
    with fp32():
        glob = (
            infonce_loss(q['a'], k['b'], queue, loss_cfg.temperature)
            + infonce_loss(q['b'], k['a'], queue, loss_cfg.temperature)
        ) / 2

    local = 0.0
    for s, t in (('a', 'b'), ('b', 'a')):
        idx_s, idx_t = match_positions(views[s]['loc'], views[t]['loc'], loss_cfg.num_matches)
        s_out = student.local_head(gather_positions(s_map[s], grid, idx_s))
        with torch.no_grad():
            t_out = teacher.local_head(gather_positions(t_map[t], grid, idx_t))
        with fp32():
            local = local + dino_local_loss(
                s_out, t_out, center, loss_cfg.student_temp, teacher_temp
            )
            # Official LocalLoss updates its centre after each of its two calls (Q6).
            mom = loss_cfg.center_momentum
            center = center * mom + (1 - mom) * t_out.mean((0, 2))
    return mim + glob + local / 2, torch.cat([k['b'], k['a']]), center


# --- step -----------------------------------------------------------------------------------------


def host_masks(seed: int, batch: int, size: int, ratio: float) -> dict:
    """Block masks as the official data loader makes them: `ceil(g*g*ratio)` random blocks."""
    rng = np.random.default_rng(seed)
    g = size // MASK_PATCH
    count = math.ceil(round(g * g * ratio, 9))
    ranks = np.argsort(rng.random((2, batch, g * g)), axis=-1).argsort(axis=-1)
    masks = (ranks < count).reshape(2, batch, g, g)
    return {'mask_a': masks[0], 'mask_b': masks[1]}


def prepare_views(batch, mean, std, channels_last: bool):
    """uint8 crops -> normalised targets, mean-filled masked inputs and full-resolution masks."""
    views = {}
    for v in 'ab':
        x = (batch[f'img_{v}'].float() / 255 - mean) / std
        pm = upsample(batch[f'mask_{v}'], x.shape[-1])
        masked = x * (1 - pm[:, None]) + x.mean((2, 3), keepdim=True) * pm[:, None]
        if channels_last:
            x, masked = (t.contiguous(memory_format=torch.channels_last) for t in (x, masked))
        views[v] = dict(
            target=x,
            masked=masked,
            pixel_mask=pm,
            block_mask=batch[f'mask_{v}'],
            loc=batch[f'loc_{v}'],
        )
    return views


def decay_groups(module: nn.Module, weight_decay: float):
    """No weight decay on tensors with ndim <= 1 (biases, norms, mask token), as cmid_jax (D5)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {'params': [p for p in params if p.ndim > 1], 'weight_decay': weight_decay},
        {'params': [p for p in params if p.ndim <= 1], 'weight_decay': 0.0},
    ]


def make_optimizer(student: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """timm's Adan with the official betas (prox-style decay); AdamW where timm has no Adan."""
    groups = decay_groups(student, weight_decay)
    if hasattr(timm.optim, 'Adan'):
        return timm.optim.Adan(
            groups, lr=lr, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=weight_decay
        )
    print('timm has no Adan: timing with AdamW instead (one fewer moment buffer).', file=sys.stderr)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def build(args):
    timm_name, arch, variant = ARCHS[args.arch]
    config = config_base.default_config()
    config.model.arch, config.model.variant = arch, variant
    config.batch_size, config.data.image_size = args.batch_size, args.image_size
    grid = args.image_size // MASK_PATCH
    # 20 of 49 positions at 224 px; the same fraction of a smaller grid.
    config.loss.num_matches = max(1, round(config.loss.num_matches * grid * grid / 49))
    student = Student(BACKBONES[arch](timm_name, args.image_size), config)
    teacher = Teacher(student)
    return config, student, teacher


def run(args) -> dict:
    device = torch.device(args.device)
    config, student, teacher = build(args)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    student.to(device, memory_format=memory_format).train()
    # The official teacher runs in train mode: BN on its own batch statistics.
    teacher.to(device, memory_format=memory_format).train()
    amp_dtype = AMP_DTYPES[args.amp]
    # fp16 needs loss scaling; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    o = config.optim
    optimizer = make_optimizer(student, o.base_lr * args.batch_size / 256, o.weight_decay)
    ema_pairs = [
        (t, s)
        for name in ('backbone', 'projector', 'local_head')
        for t, s in zip(getattr(teacher, name).parameters(), getattr(student, name).parameters())
    ]
    t_params, s_params = [t for t, _ in ema_pairs], [s for _, s in ema_pairs]

    loss_fn = torch.compile(cmid_loss) if args.compile else cmid_loss
    m = config.model
    queue = F.normalize(torch.randn(config.loss.queue_size, m.proj_dim, device=device), dim=1)
    center = torch.zeros(m.local_prototypes, device=device)
    ptr = 0
    mean = torch.tensor(config.data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(config.data.std, device=device).view(1, 3, 1, 1)
    np_batch = synthetic_batch(config.seed, args.batch_size, args.image_size)
    np_batch.update(host_masks(config.seed, args.batch_size, args.image_size, config.mask.ratio))
    batch = {k: torch.from_numpy(v).to(device) for k, v in np_batch.items()}
    for v in 'ab':  # NHWC uint8 -> NCHW.
        batch[f'img_{v}'] = (
            batch[f'img_{v}'].permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
        )
    # The schedules change values, not the cost: the first step's teacher temperature and momentum.
    teacher_temp, momentum = config.loss.teacher_temp_warmup, o.ema_momentum

    def step():
        nonlocal center, ptr
        views = prepare_views(batch, mean, std, args.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, keys, center = loss_fn(
                student, teacher, queue, center, views, config, teacher_temp, device.type
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            torch._foreach_lerp_(t_params, s_params, 1 - momentum)  # t = m t + (1 - m) s.
            idx = (ptr + torch.arange(keys.shape[0], device=device)) % queue.shape[0]
            queue[idx] = keys.detach()
        ptr = (ptr + keys.shape[0]) % queue.shape[0]
        return loss.detach()

    cuda = device.type == 'cuda'
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.warmup):
        step()
        if i == 0:
            sync()
            first_step_s = time.perf_counter() - start
    sync()

    # Per-step times from CUDA events recorded between steps: no host sync inside the loop.
    stamps = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)] if cuda else []
    host = []
    start = time.perf_counter()
    if cuda:
        stamps[0].record()
    for i in range(args.steps):
        loss = step()
        if cuda:
            stamps[i + 1].record()
        else:
            host.append(time.perf_counter())  # Eager CPU ops are synchronous.
    sync()
    total_s = time.perf_counter() - start
    if not math.isfinite(float(loss)):
        raise FloatingPointError(f'non-finite loss {float(loss)}')
    step_s = (
        [stamps[i].elapsed_time(stamps[i + 1]) / 1e3 for i in range(args.steps)]
        if cuda
        else list(np.diff([start] + host))
    )

    mean_s = total_s / args.steps
    shape = flops.StepShape.from_config(config, student.backbone.flops(args.image_size))
    model_flops = flops.step_flops(shape, args.batch_size)
    achieved = model_flops['per_step'] / mean_s
    kind = torch.cuda.get_device_name(device) if cuda else device.type
    peak = flops.peak_flops(kind) if cuda else None
    return {
        'implementation': 'torch',
        'config': ' '.join(['torch_reference.py'] + sys.argv[1:]),
        'arch': m.arch,
        'variant': m.variant,
        'image_size': args.image_size,
        'compute_dtype': {'bf16': 'bfloat16', 'fp16': 'float16', 'none': 'float32'}[args.amp],
        'attention_impl': student.backbone.attention_impl,
        'remat': None,  # Eager PyTorch keeps every activation autograd saves.
        'data': 'synthetic',
        'platform': 'gpu' if cuda else device.type,
        'device_kind': kind,
        'device_count': 1,
        'process_count': 1,
        'global_batch': args.batch_size,
        'warmup_steps': args.warmup,
        'timed_steps': args.steps,
        'step_time_ms_mean': 1e3 * mean_s,
        'step_time_ms_median': 1e3 * float(np.median(step_s)),
        'images_per_sec': args.batch_size / mean_s,
        'model_flops_per_image': model_flops['per_image'],
        'model_flops_per_step': model_flops['per_step'],
        'xla_flops_per_device': None,
        'achieved_tflops': achieved / 1e12,
        'peak_tflops_per_device': peak / 1e12 if peak else None,
        'mfu': achieved / peak if peak else None,
        'peak_memory_bytes': torch.cuda.max_memory_allocated(device) if cuda else None,
        # The first warm-up step includes torch.compile's tracing and code generation.
        'compile_time_s': first_step_s if args.compile else None,
        'versions': {
            'python': platform.python_version(),
            'torch': torch.__version__,
            'timm': timm.__version__,
            'cuda': torch.version.cuda,
            'cudnn': torch.backends.cudnn.version() if cuda else None,
        },
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--arch', choices=sorted(ARCHS), default='vit_base')
    p.add_argument('--image-size', type=int, default=224)
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--amp', choices=sorted(AMP_DTYPES), default='bf16')
    p.add_argument('--compile', action='store_true', help='torch.compile the forward and losses.')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args(argv)
    if args.image_size % MASK_PATCH:
        p.error(f'--image-size must be a multiple of {MASK_PATCH}')
    if args.steps < 1 or args.warmup < 1:
        p.error('--steps and --warmup must be >= 1 (the first warm-up step holds the compilation)')
    return args


if __name__ == '__main__':
    # TF32 matmuls stay off (PyTorch's default): the float32 loss matmuls (InfoNCE against the
    # queue) then match cmid_jax's Precision.HIGHEST. Convolutions: cuDNN picks the fastest kernels.
    torch.backends.cudnn.benchmark = True
    print(json.dumps(run(parse_args())), flush=True)
