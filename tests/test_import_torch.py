"""Import of official CMID PyTorch checkpoints into a cmid_jax workdir.

Official-layout files are built on the fly, two independent ways: from a cmid_jax state through
`convert/official.py`, and from real timm backbones inside a PyTorch module tree laid out like the
official `PretrainModel` (cmid-method.md 10.2). Configs are the smoke presets (ResNet 'nano' with BN
in the local head, ViT-mu/16 without), so no test downloads or trains anything large.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
pytest.importorskip('safetensors')

from cmid_jax import errors, optim, train  # noqa: E402
from cmid_jax.config_resolve import resolve  # noqa: E402
from cmid_jax.convert import import_torch, official, weights  # noqa: E402
from cmid_jax.models import backbone_module  # noqa: E402
from cmid_jax.models.cmid import backbone_variables  # noqa: E402
from cmid_jax.restore import restore_train_state  # noqa: E402
from cmid_jax.step import TrainStep  # noqa: E402
from configs import resnet50, swinb, vitb  # noqa: E402

from conftest import run_tool  # noqa: E402

CONFIGS = {'resnet': resnet50, 'vit': vitb, 'swin': swinb}
PARITY_TOL = 1e-4
PARTS = (
    'params',
    'batch_stats',
    'teacher_params',
    'teacher_batch_stats',
    'queue',
    'queue_ptr',
    'center',
)


def smoke_config(arch: str, **model):
    config = CONFIGS[arch].get_config('smoke')
    for k, v in model.items():
        config.model[k] = v
    return config


def trainer_for(config) -> TrainStep:
    return TrainStep.create(resolve(config), optim.Schedule(10, 4))


def random_state(config, seed: int = 0) -> dict:
    """A train state with every leaf random (no compile): BN variances > 0, a mid-queue pointer."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        if np.issubdtype(x.dtype, np.integer):
            return np.asarray(rng.integers(1, 9, x.shape), x.dtype)
        if getattr(path[-1], 'key', None) == 'var':
            return rng.uniform(0.5, 2.0, x.shape).astype(x.dtype)
        return rng.normal(0.0, 0.1, x.shape).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, trainer_for(config).abstract_state)


def save_trainer_checkpoint(sd: dict, path: str, *, pickled_objects: bool = False) -> str:
    """An official-style trainer checkpoint; `pickled_objects` adds a non-tensor object, as the
    official metric storage, which `weights_only=True` refuses."""
    ckpt = {
        'epoch': 5,
        'num_gpus': 4,
        'model': {k: torch.as_tensor(v) for k, v in sd.items()},
        'optimizer': {'state': {}, 'param_groups': []},
    }
    if pickled_objects:
        ckpt['metric_storage'] = argparse.Namespace(history={'loss': [1.0]})
    torch.save(ckpt, path)
    return path


def assert_tree_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def assert_nothing_written(workdir) -> None:
    assert not os.path.exists(workdir) or not os.listdir(workdir)


# ------------------------------------------------------------------------------ full checkpoints


@pytest.mark.parametrize('arch', ['resnet', 'vit', 'swin'])
def test_full_checkpoint_round_trip_is_exact(arch, tmp_path, caplog):
    config = smoke_config(arch)
    state = random_state(config)
    sd = official.to_official_state_dict(state, arch=arch)
    m, p = config.model, config.model.local_prototypes
    assert sd['queue'].shape == (m.proj_dim, config.loss.queue_size)  # one key per column
    assert sd['class_loss.center'].shape == (1, p, 1) and sd['queue_ptr'].dtype == np.int64
    width = trainer_for(config).nets.backbone.mask_token_width
    assert sd['online_encoder.mask_token'].shape == (
        (1, width, 1, 1) if arch == 'resnet' else (1, 1, width)
    )
    np.testing.assert_array_equal(sd['class_projector.last_layer.weight_g'], 1.0)
    assert ('class_projector.mlp.6.weight' in sd) == (arch == 'resnet')  # BN shifts the indices

    path = save_trainer_checkpoint(sd, str(tmp_path / 'full.pth'), pickled_objects=True)
    workdir = str(tmp_path / 'wd')
    with caplog.at_level('WARNING'):
        record = import_torch.import_checkpoint(path, config, workdir)
    assert 'none of their code ran' in caplog.text  # the trainer checkpoint's metric storage
    assert record['kind'] == 'full' and record['source_epoch'] == 5 and record['step'] == 0

    _, restored, step = restore_train_state(workdir)
    assert step == 0 and int(restored['step']) == 0
    for part in PARTS:
        assert_tree_equal(restored[part], state[part])
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(restored['opt_state']))
    # ... and back to PyTorch: the same official state_dict, bit for bit.
    again = official.to_official_state_dict(restored, arch=arch)
    assert again.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(again[k], sd[k], err_msg=k)
    with open(os.path.join(workdir, 'import.json'), encoding='utf-8') as f:
        assert json.load(f)['kind'] == 'full'
    # Exporting the imported workdir gives what the official extract.py gives.
    from safetensors.numpy import load_file

    out = str(tmp_path / 'student.safetensors')
    weights.export_backbone(workdir, out, layout='mmcls' if arch == 'swin' else None)
    prefix = official.BACKBONE_PREFIXES['student']
    extracted = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    exported = load_file(out)
    assert exported.keys() == extracted.keys()
    for k, v in extracted.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


# --- an official-layout PyTorch module tree around real timm backbones ------------------------


def timm_backbone(arch: str):
    if arch == 'resnet':  # cmid_jax 'tiny': bottleneck [1,1,1,1] ('nano' has no torch twin)
        return timm.create_model('resnet50', layers=[1, 1, 1, 1], num_classes=0, global_pool='')
    return timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=0
    )


class OfficialLike(torch.nn.Module):
    """The parameter layout of the official `PretrainModel` (MoCo variant), heads as in 10.2."""

    def __init__(
        self,
        arch: str,
        c: int,
        hidden: int,
        proj_dim: int,
        local_hidden: int,
        bottleneck: int,
        prototypes: int,
        queue_size: int,
        stride: int,
    ):
        super().__init__()
        nn = torch.nn
        use_bn = arch == 'resnet'
        self.online_encoder = nn.Module()
        self.online_encoder.model = timm_backbone(arch)
        width = 64
        token_shape = (1, width, 1, 1) if arch == 'resnet' else (1, 1, width)
        self.online_encoder.mask_token = nn.Parameter(torch.zeros(token_shape))
        self.branch_encoder = timm_backbone(arch)
        self.mim2org = nn.Module()
        self.mim2org.decoder_pred = nn.Sequential(
            nn.Conv2d(c, stride * stride * 3, 1), nn.PixelShuffle(stride)
        )
        for name in ('online_projector', 'branch_projector'):
            proj = nn.Module()
            proj.layer = nn.Sequential(
                nn.Sequential(
                    nn.Linear(c, hidden), nn.Identity(), nn.ReLU(), nn.Linear(hidden, proj_dim)
                )
            )
            setattr(self, name, proj)
        for name in ('class_projector', 'branch_class_projector'):
            head = nn.Module()
            layers = [nn.Conv1d(c, local_hidden, 1)]
            for _ in range(2):
                layers += [nn.BatchNorm1d(local_hidden)] if use_bn else []
                layers += [nn.GELU(), nn.Conv1d(local_hidden, local_hidden, 1)]
            layers[-1] = nn.Conv1d(local_hidden, bottleneck, 1)
            head.mlp = nn.Sequential(*layers)
            with warnings.catch_warnings():  # the official code uses the legacy weight_norm,
                warnings.simplefilter('ignore', FutureWarning)  # hence weight_g / weight_v keys
                head.last_layer = torch.nn.utils.weight_norm(
                    nn.Conv1d(bottleneck, prototypes, 1, bias=False)
                )
            head.last_layer.weight_g.data.fill_(1.0)
            setattr(self, name, head)
        self.class_loss = nn.Module()
        self.class_loss.register_buffer('center', torch.randn(1, prototypes, 1))
        self.register_buffer(
            'queue', torch.nn.functional.normalize(torch.randn(proj_dim, queue_size), dim=0)
        )
        self.register_buffer('queue_ptr', torch.tensor([6], dtype=torch.long))

    @staticmethod
    def local(head, x):  # (B, N, C) -> (B, N, P)
        h = torch.nn.functional.normalize(head.mlp(x.permute(0, 2, 1)), dim=1)
        return head.last_layer(h).permute(0, 2, 1)


def official_like(config, seed: int = 0) -> OfficialLike:
    m = config.model
    arch = m.arch
    torch.manual_seed(seed)
    module = OfficialLike(
        arch,
        2048 if arch == 'resnet' else 64,
        m.proj_hidden_dim,
        m.proj_dim,
        m.local_hidden_dim,
        m.local_bottleneck_dim,
        m.local_prototypes,
        config.loss.queue_size,
        32 if arch == 'resnet' else 16,
    )
    with torch.no_grad():  # non-trivial BN affine and statistics, biases and mask token
        for sub in module.modules():
            if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
                sub.weight.uniform_(0.5, 1.5)  # also timm's zero-initialised bn3
                sub.running_mean.normal_(0.0, 0.1)
                sub.running_var.uniform_(0.5, 2.0)
        for name, p in module.named_parameters():
            if name.endswith('bias') or name.endswith('mask_token'):
                p.normal_(0.0, 0.1)
    return module.eval()


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['resnet', 'vit'])
def test_full_checkpoint_from_timm_modules_matches_torch(arch, tmp_path):
    config = smoke_config(arch, **({'variant': 'tiny'} if arch == 'resnet' else {}))
    module = official_like(config)
    path = str(tmp_path / 'full.pth')
    save_trainer_checkpoint(module.state_dict(), path)  # tensors only: weights_only=True loads it
    import_torch.import_checkpoint(path, config, str(tmp_path / 'wd'))
    _, state, _ = restore_train_state(str(tmp_path / 'wd'))
    nets = trainer_for(config).nets

    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
    for which, tm in (('student', module.online_encoder.model), ('teacher', module.branch_encoder)):
        ours, _ = nets.apply('backbone', backbone_variables(state, which), x, train=False)
        with torch.no_grad():
            ref = tm.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
        ref = ref[:, 1:].reshape(ours.shape) if arch == 'vit' else ref.permute(0, 2, 3, 1)
        err = float(np.abs(np.asarray(ours) - ref.numpy()).max())
        print(f'{arch} {which} backbone from timm: max |jax - torch| = {err:.2e}')
        assert err < PARITY_TOL

    c = 2048 if arch == 'resnet' else 64
    feats = rng.normal(size=(2, 4, c)).astype(np.float32)
    fmap = rng.normal(size=(2, 2, 2, c)).astype(np.float32)
    with torch.no_grad():
        t = lambda a: torch.from_numpy(a)
        refs = {
            'projector': torch.nn.functional.normalize(
                module.online_projector.layer(t(feats[:, 0])), dim=-1
            ),
            'local_head': OfficialLike.local(module.class_projector, t(feats)),
            'teacher_local_head': OfficialLike.local(module.branch_class_projector, t(feats)),
            'decoder': module.mim2org.decoder_pred(t(fmap).permute(0, 3, 1, 2)).permute(0, 2, 3, 1),
        }
    student = {
        'params': state['params']['local_head'],
        'batch_stats': state['batch_stats']['local_head'],
    }
    teacher = {
        'params': state['teacher_params']['local_head'],
        'batch_stats': state['teacher_batch_stats']['local_head'],
    }
    ours = {
        'projector': nets.apply(
            'projector', {'params': state['params']['projector']}, feats[:, 0], train=False
        )[0],
        'local_head': nets.apply('local_head', student, feats, train=False)[0],
        'teacher_local_head': nets.apply('local_head', teacher, feats, train=False)[0],
        'decoder': nets.apply('decoder', {'params': state['params']['decoder']}, fmap, train=False)[
            0
        ],
    }
    for k, ref in refs.items():
        np.testing.assert_allclose(np.asarray(ours[k]), ref.numpy(), atol=1e-5, err_msg=k)
    np.testing.assert_array_equal(state['queue'], module.queue.numpy().T)
    np.testing.assert_array_equal(state['center'], module.class_loss.center.numpy().reshape(-1))
    np.testing.assert_array_equal(
        state['params']['mask_token'], module.online_encoder.mask_token.detach().numpy().reshape(-1)
    )
    assert int(state['queue_ptr']) == 6


@pytest.mark.slow
def test_training_resumes_from_imported_workdir(tmp_path):
    config = smoke_config('vit')
    sd = official.to_official_state_dict(random_state(config), arch='vit')
    path = save_trainer_checkpoint(sd, str(tmp_path / 'f.pth'))
    workdir = str(tmp_path / 'wd')
    import_torch.import_checkpoint(path, config, workdir)
    _, imported, _ = restore_train_state(workdir)

    config.total_steps = 2
    logged = train.train_and_evaluate(config, workdir)
    assert np.isfinite(logged['loss'])
    _, state, step = restore_train_state(workdir)
    assert step == 2 and int(state['step']) == 2
    kernel = lambda s: np.asarray(s['params']['backbone']['patch_embed']['proj']['kernel'])
    assert not np.array_equal(kernel(state), kernel(imported))  # it trained from the import
    assert np.abs(kernel(state) - kernel(imported)).max() < 0.1  # ... without starting over


# ------------------------------------------------------------------------------ backbone-only


def extracted_vit_backbone(config, path) -> dict:
    """What extract.py writes: the student backbone keys with their prefix stripped."""
    sd = official.to_official_state_dict(random_state(config), arch='vit')
    prefix = official.BACKBONE_PREFIXES['student']
    extracted = {
        k[len(prefix) :]: torch.from_numpy(v) for k, v in sd.items() if k.startswith(prefix)
    }
    torch.save(extracted, str(path))
    return extracted


def test_extracted_backbone_initialises_student_and_teacher(tmp_path):
    config = smoke_config('vit')
    extracted = extracted_vit_backbone(config, tmp_path / 'backbone.pth')
    record = import_torch.import_checkpoint(
        str(tmp_path / 'backbone.pth'), config, str(tmp_path / 'wd')
    )
    assert record['kind'] == 'backbone' and record['dropped_keys'] == []

    _, state, _ = restore_train_state(str(tmp_path / 'wd'))
    for which in ('student', 'teacher'):
        exported = backbone_module('vit').to_torch_state_dict(backbone_variables(state, which))
        assert exported.keys() == extracted.keys()
        for k, v in exported.items():
            np.testing.assert_array_equal(v, extracted[k].numpy(), err_msg=f'{which} {k}')
    # Fresh heads, identical in student and teacher (a new run's init), an empty centre.
    for name in ('projector', 'local_head'):
        assert_tree_equal(state['teacher_params'][name], state['params'][name])
    assert not np.any(state['center']) and int(state['queue_ptr']) == 0
    assert not np.any(state['params']['mask_token'])


def test_plain_timm_state_dict_drops_classifier(tmp_path):
    from safetensors.torch import save_file

    config = smoke_config('vit')
    tm = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=10
    )
    save_file(tm.state_dict(), str(tmp_path / 'timm.safetensors'))
    record = import_torch.import_checkpoint(
        str(tmp_path / 'timm.safetensors'), config, str(tmp_path / 'wd')
    )
    assert record['dropped_keys'] == ['head.bias', 'head.weight']
    _, state, _ = restore_train_state(str(tmp_path / 'wd'))
    np.testing.assert_array_equal(
        state['teacher_params']['backbone']['pos_embed'], tm.pos_embed.detach().numpy()
    )
    np.testing.assert_array_equal(
        state['params']['backbone']['blocks_1']['attn']['qkv']['kernel'],
        tm.blocks[1].attn.qkv.weight.detach().numpy().T,
    )


# ------------------------------------------------------------------------------ errors


@pytest.fixture(scope='module')
def resnet_full_sd():
    return official.to_official_state_dict(random_state(smoke_config('resnet')), arch='resnet')


def _import_error(sd_or_path, config, tmp_path) -> str:
    path = (
        sd_or_path
        if isinstance(sd_or_path, str)
        else save_trainer_checkpoint(sd_or_path, str(tmp_path / 'ckpt.pth'))
    )
    workdir = tmp_path / 'wd'
    workdir.mkdir()
    with pytest.raises(ValueError) as e:
        import_torch.import_checkpoint(path, config, str(workdir))
    assert_nothing_written(workdir)
    return str(e.value)


def test_unknown_missing_and_misshapen_keys_in_one_error(resnet_full_sd, tmp_path):
    sd = dict(resnet_full_sd)
    del sd['class_projector.mlp.4.running_var']
    del sd['branch_encoder.layer2.0.conv2.weight']
    sd['extra.weight'] = np.zeros(3, np.float32)
    sd['queue'] = np.zeros((32, 128), np.float32)
    msg = _import_error(sd, smoke_config('resnet'), tmp_path)
    for needle in (
        'class_projector.mlp.4.running_var',
        '[branch_encoder.*',
        'layer2.0.conv2.weight',
        'extra.weight',
        'queue: got (32, 128), expected (32, 64)',
    ):
        assert needle in msg, needle


def test_arch_mismatch_is_reported(resnet_full_sd, tmp_path):
    msg = _import_error(resnet_full_sd, smoke_config('vit'), tmp_path)
    assert "looks like a 'resnet' backbone" in msg
    assert 'layer1.0.conv1.weight' in msg and 'pos_embed' in msg  # unknown and missing


def test_head_width_mismatch_is_reported(resnet_full_sd, tmp_path):
    msg = _import_error(resnet_full_sd, smoke_config('resnet', local_prototypes=128), tmp_path)
    assert 'class_projector.last_layer.weight_v: got (64, 32, 1), expected (128, 32, 1)' in msg
    assert 'class_loss.center: got (1, 64, 1), expected (1, 128, 1)' in msg


def test_backbone_variant_mismatch_is_reported(tmp_path):
    # A torchvision-width ('tiny') backbone for a config of the quarter-width 'nano'.
    torch.save(timm_backbone('resnet').state_dict(), str(tmp_path / 'tiny.pth'))
    msg = _import_error(str(tmp_path / 'tiny.pth'), smoke_config('resnet'), tmp_path)
    assert 'conv1.weight: got (64, 3, 7, 7), expected (16, 3, 7, 7)' in msg


def test_prototype_norm_other_than_one_is_refused(resnet_full_sd, tmp_path):
    sd = dict(resnet_full_sd)
    sd['branch_class_projector.last_layer.weight_g'] = (
        sd['branch_class_projector.last_layer.weight_g'] * 2
    )
    msg = _import_error(sd, smoke_config('resnet'), tmp_path)
    assert 'branch_class_projector.last_layer.weight_g: must be all ones' in msg


def test_pickled_backbone_file_is_refused(tmp_path):
    torch.save(
        {'conv1.weight': torch.zeros(1), 'junk': argparse.Namespace()}, str(tmp_path / 'b.pth')
    )
    msg = _import_error(str(tmp_path / 'b.pth'), smoke_config('resnet'), tmp_path)
    assert 'not a CMID trainer checkpoint' in msg


class _WritesAMarker:
    """Unpickling this runs `exec`, which writes the marker file: what a crafted .pth does."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").write("code from the checkpoint ran")',)


@pytest.mark.parametrize('where', ['beside the model', 'inside the model', 'the whole file'])
def test_a_crafted_checkpoint_never_runs_its_code(resnet_full_sd, tmp_path, where, caplog):
    marker = tmp_path / 'MARKER'
    payload = _WritesAMarker(str(marker))
    model = {k: torch.as_tensor(v) for k, v in resnet_full_sd.items()}
    ckpt = {
        'beside the model': {'epoch': 5, 'model': model, 'metric_storage': payload},
        'inside the model': {'epoch': 5, 'model': dict(model, evil=payload)},
        'the whole file': payload,
    }[where]
    path = str(tmp_path / 'crafted.pth')
    torch.save(ckpt, path)
    config = smoke_config('resnet')
    with caplog.at_level('WARNING'):
        if where == 'beside the model':  # the tensors are fine: it imports, inertly
            record = import_torch.import_checkpoint(path, config, str(tmp_path / 'wd'))
            assert record['kind'] == 'full'
        else:
            with pytest.raises(ValueError, match='not tensors|expected a state_dict'):
                import_torch.import_checkpoint(path, config, str(tmp_path / 'wd'))
    assert not marker.exists()
    assert 'builtins.exec' in caplog.text or '__builtin__.exec' in caplog.text


def test_existing_checkpoints_need_overwrite(resnet_full_sd, tmp_path):
    config = smoke_config('resnet')
    path = save_trainer_checkpoint(resnet_full_sd, str(tmp_path / 'ckpt.pth'))
    workdir = str(tmp_path / 'wd')
    import_torch.import_checkpoint(path, config, workdir)
    with pytest.raises(errors.WorkdirError, match='overwrite'):
        import_torch.import_checkpoint(path, config, workdir)
    # The bare `model` state_dict as .safetensors is a full checkpoint too.
    from safetensors.numpy import save_file

    save_file(
        dict(resnet_full_sd, queue_ptr=np.array([3], np.int64)), str(tmp_path / 'b.safetensors')
    )
    import_torch.import_checkpoint(str(tmp_path / 'b.safetensors'), config, workdir, overwrite=True)
    _, state, _ = restore_train_state(workdir)
    assert int(state['queue_ptr']) == 3


# ------------------------------------------------------------------------------ command line


def test_cli_with_preset_and_overrides(resnet_full_sd, tmp_path):
    path = save_trainer_checkpoint(resnet_full_sd, str(tmp_path / 'ckpt.pth'))
    workdir = str(tmp_path / 'wd')
    proc = run_tool(
        'tools.import_torch',
        f'--checkpoint={path}',
        '--config=configs/resnet50.py:smoke',
        '--config.seed=7',
        f'--workdir={workdir}',
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config, state, step = restore_train_state(workdir)
    assert step == 0 and config.seed == 7 and config.model.variant == 'nano'
    np.testing.assert_array_equal(state['queue'], resnet_full_sd['queue'].T)


def test_rgb_backbone_into_a_four_band_model_adapts_the_stem(tmp_path):
    """timm's rule: the RGB kernel repeated over the bands and scaled by 3/N, in both networks."""
    config = smoke_config('vit')
    extracted = extracted_vit_backbone(config, tmp_path / 'backbone.pth')
    config.data.bands = (0, 1, 2, 3)
    config.data.mean, config.data.std = (0.3,) * 4, (0.2,) * 4
    import_torch.import_checkpoint(str(tmp_path / 'backbone.pth'), config, str(tmp_path / 'wd'))
    _, state, _ = restore_train_state(str(tmp_path / 'wd'))
    rgb = extracted['patch_embed.proj.weight'].numpy().transpose(2, 3, 1, 0)  # OIHW -> HWIO
    expected = np.concatenate([rgb, rgb[:, :, :1]], axis=2) * 3 / 4
    for coll in ('params', 'teacher_params'):
        kernel = np.asarray(state[coll]['backbone']['patch_embed']['proj']['kernel'])
        np.testing.assert_allclose(kernel, expected, rtol=1e-6)
