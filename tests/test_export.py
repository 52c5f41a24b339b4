"""Export of a checkpoint's backbone to PyTorch: strict loads, feature parity, metadata, CLI.

Workdirs are real 3-step smoke runs (ViT-mu/16 and the bottleneck [1,1,1,1] ResNet 'tiny', 64 px),
built once per module; parity runs on CPU in float32 with BN in eval mode (running statistics).
The full-size ResNet-50 and ViT-B/16 are checked on randomly filled abstract parameters, without a
workdir (their optimizer state alone would be ~0.5 GB).
"""

from __future__ import annotations

import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('timm')
pytest.importorskip('torchvision')
pytest.importorskip('safetensors')

from cmid_jax import train  # noqa: E402
from cmid_jax.convert import weights  # noqa: E402
from cmid_jax.models import backbone_module, build_backbone  # noqa: E402
from cmid_jax.models.cmid import backbone_variables  # noqa: E402
from cmid_jax.restore import restore_train_state  # noqa: E402
from configs import resnet50, vitb  # noqa: E402

from conftest import run_tool  # noqa: E402

PARITY_TOL = 1e-4


def _smoke_run(tmp_path_factory, config_module, name: str, **model) -> types.SimpleNamespace:
    config = config_module.get_config('smoke')
    config.total_steps = 3
    for k, v in model.items():
        config.model[k] = v
    workdir = str(tmp_path_factory.mktemp(name))
    train.train_and_evaluate(config, workdir)
    config, state, step = restore_train_state(workdir)
    return types.SimpleNamespace(workdir=workdir, config=config, state=state, step=step)


@pytest.fixture(scope='module')
def vit_run(tmp_path_factory):
    return _smoke_run(tmp_path_factory, vitb, 'vit')


@pytest.fixture(scope='module')
def resnet_run(tmp_path_factory):
    # 'nano' (the smoke default) has no torchvision counterpart; 'tiny' has both.
    return _smoke_run(tmp_path_factory, resnet50, 'resnet', variant='tiny')


def _jax_features(run, x: np.ndarray, which: str = 'student') -> np.ndarray:
    c = run.config
    model = build_backbone(c.model.arch, c.model.variant, img_size=c.data.image_size)
    variables = backbone_variables(run.state, which)
    return np.asarray(model.apply(variables, x, train=False))


def torch_features(model, spec: dict, x: np.ndarray) -> np.ndarray:
    """NHWC features of an exported model, read the way its metadata `features` entry says."""
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        if spec['library'] == 'torchvision':
            for name in ('conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4'):
                xt = getattr(model, name)(xt)
            return xt.permute(0, 2, 3, 1).numpy()
        out = model.forward_features(xt)
        if hasattr(model, 'num_prefix_tokens'):  # ViT: patch tokens back onto their grid
            tokens = out[:, model.num_prefix_tokens :]
            side = int(round(tokens.shape[1] ** 0.5))
            return tokens.reshape(x.shape[0], side, side, -1).numpy()
        if 'swin' in spec.get('class', spec.get('model_name', '')).lower():
            return out.numpy()  # timm Swin features are NHWC already
        return out.permute(0, 2, 3, 1).numpy()


def _input(size: int, seed: int = 0, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


# ------------------------------------------------------------------------------ workdir exports


@pytest.mark.slow
@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
@pytest.mark.parametrize('arch', ['vit', 'resnet'])
def test_export_loads_strict_and_matches_jax_features(arch, suffix, request, tmp_path):
    run = request.getfixturevalue(f'{arch}_run')
    out = str(tmp_path / f'backbone{suffix}')
    meta = weights.export_backbone(run.workdir, out)
    assert os.path.exists(out) and os.path.exists(out + '.json')
    assert meta['weights_format'] == suffix[1:] and meta['step'] == run.step == 3

    x = _input(run.config.data.image_size)
    ours = _jax_features(run, x)
    specs = [meta['torch_model']] + meta['torch_model_alternatives']
    assert [s['library'] for s in specs] == (['timm'] if arch == 'vit' else ['timm', 'torchvision'])
    for i, spec in enumerate(specs):
        # Primary: strict; torchvision: only its classifier is missing (checked by the loader).
        model = weights.load_torch_model(out + '.json', alternative=None if i == 0 else i - 1)
        ref = torch_features(model, spec, x)
        err = float(np.abs(ours - ref).max())
        print(
            f'{arch} {spec["library"]} {suffix}: max |jax - torch| = {err:.2e} '
            f'(max |feature| {np.abs(ref).max():.2f})'
        )
        assert ours.shape == ref.shape and err < PARITY_TOL


@pytest.mark.slow
def test_teacher_export_and_metadata(vit_run, tmp_path):
    out = str(tmp_path / 'teacher.safetensors')
    meta = weights.export_backbone(vit_run.workdir, out, step=3, which='teacher')
    with open(out + '.json', encoding='utf-8') as f:
        assert json.load(f) == meta
    c = vit_run.config
    assert meta['which'] == 'teacher' and meta['step'] == 3 and meta['arch'] == 'vit'
    assert meta['input']['size'] == [64, 64] and meta['input']['channels'] == 3
    assert meta['input']['bands'] == ['red', 'green', 'blue']
    assert meta['input']['pixel_dtype'] == 'uint8' and '/ 255 ' in meta['input']['normalisation']
    assert meta['input']['mean'] == list(c.data.mean) and meta['input']['std'] == list(c.data.std)
    assert meta['config']['model']['variant'] == 'mu/16' and meta['config']['total_steps'] == 3
    assert meta['torch_model'] == {
        'library': 'timm',
        'class': 'timm.models.vision_transformer.VisionTransformer',
        'kwargs': dict(
            img_size=64,
            patch_size=16,
            embed_dim=64,
            depth=2,
            num_heads=2,
            in_chans=3,
            num_classes=0,
        ),
        'features': meta['torch_model']['features'],
    }

    from safetensors.numpy import load_file

    saved = load_file(out)
    teacher = weights.backbone_state_dict(vit_run.state, 'vit', 'teacher')
    student = weights.backbone_state_dict(vit_run.state, 'vit', 'student')
    assert saved.keys() == teacher.keys() and len(saved) == meta['num_tensors']
    for k in saved:
        np.testing.assert_array_equal(saved[k], teacher[k], err_msg=k)
    # Three EMA steps apart: the teacher export really is the teacher.
    assert any(not np.array_equal(teacher[k], student[k]) for k in teacher)


def test_metadata_names_no_path_of_the_exporting_machine(tmp_path, monkeypatch):
    """The metadata is meant to be shared: the workdir and the config's data and evaluation paths
    keep their last component only. No training: a zero-filled state of the smoke config."""
    from cmid_jax import optim
    from cmid_jax.config_resolve import resolve
    from cmid_jax.step import TrainStep

    config = vitb.get_config('smoke')
    config.data.path = str(tmp_path / 'data' / 'AID')
    config.eval.path = str(tmp_path / 'data' / 'AID_labelled') + '/'
    config = resolve(config)
    abstract = TrainStep.create(config, optim.Schedule(1, 1)).abstract_state
    state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
    monkeypatch.setattr(weights, 'restore_train_state', lambda workdir, step: (config, state, 0))
    workdir = tmp_path / 'runs' / 'vit_smoke'
    out = str(tmp_path / 'out' / 'vit.safetensors')

    meta = weights.export_backbone(str(workdir) + '/', out)

    assert meta['workdir'] == 'vit_smoke'
    assert meta['config']['data']['path'] == 'AID'
    assert meta['config']['eval']['path'] == 'AID_labelled'
    with open(out + '.json', encoding='utf-8') as f:
        text = f.read()
    assert str(tmp_path) not in text
    strings = []

    def collect(x):
        if isinstance(x, dict):
            for v in x.values():
                collect(v)
        elif isinstance(x, list):
            for v in x:
                collect(v)
        elif isinstance(x, str):
            strings.append(x)

    collect(json.loads(text))
    assert not [x for x in strings if os.path.isabs(x)], [x for x in strings if os.path.isabs(x)]


@pytest.mark.slow
def test_cli_writes_safetensors_without_torch(vit_run, tmp_path):
    out = str(tmp_path / 'cli.safetensors')
    # torch made unimportable: the safetensors route must not need it.
    code = (
        "import runpy, sys; sys.modules['torch'] = None; "
        "runpy.run_module('cmid_jax.tools.export', run_name='__main__')"
    )
    proc = run_tool(
        '', f'--workdir={vit_run.workdir}', f'--out={out}', '--which=teacher', python_code=code
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out + '.json', encoding='utf-8') as f:
        meta = json.load(f)
    assert meta['which'] == 'teacher' and meta['weights'] == 'cli.safetensors'
    model = weights.load_torch_model(out + '.json')
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_exported_files_are_readable_by_others(vit_run, tmp_path, suffix):
    """Weights and metadata get the umask's usual mode (0644 under 022), not owner-only."""
    previous = os.umask(0o022)
    try:
        out = str(tmp_path / f'shared{suffix}')
        weights.export_backbone(vit_run.workdir, out)
    finally:
        os.umask(previous)
    for path in (out, out + '.json'):
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o644), path


def test_pth_without_torch_is_a_clear_error(vit_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch', None)
    with pytest.raises(ImportError, match='needs PyTorch'):
        weights.export_backbone(vit_run.workdir, str(tmp_path / 'x.pth'))
    assert not os.listdir(tmp_path)


def test_bad_arguments(vit_run, tmp_path):
    with pytest.raises(ValueError, match='must end in one of'):
        weights.export_backbone(vit_run.workdir, str(tmp_path / 'x.npz'))
    with pytest.raises(ValueError, match='which'):
        weights.export_backbone(vit_run.workdir, str(tmp_path / 'x.pth'), which='ema')
    with pytest.raises(
        ValueError, match=r"ViT converts to the key layouts \['timm'\], not 'mmcls'"
    ):
        weights.export_backbone(vit_run.workdir, str(tmp_path / 'x.pth'), layout='mmcls')
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------ full-size models


def _random_variables(model, img: int, seed: int) -> dict:
    """Random numpy leaves from the abstract init (no compile): BN scales ~1, variances > 0."""
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, img, img, 3)), train=False)
    )
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = path[-1].key
        if name == 'var':
            return rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
        if name == 'scale':
            return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
        if name == 'kernel':
            fan_in = np.prod(x.shape[:-1])
            return rng.normal(0.0, 1.0 / np.sqrt(fan_in), x.shape).astype(np.float32)
        return rng.normal(0.0, 0.05, x.shape).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(leaf, abstract)
    return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def _as_state(variables: dict) -> dict:
    return {
        'params': {'backbone': variables['params']},
        'batch_stats': {'backbone': variables['batch_stats']},
    }


def _load_checked(spec: dict, state_dict: dict):
    model = weights.build_torch_model(spec)
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=False
    )
    assert not unexpected and sorted(missing) == sorted(spec.get('missing_keys', []))
    return model.eval()


def test_resnet50_export_loads_into_torchvision_and_timm():
    model = build_backbone('resnet', '50', img_size=224)
    variables = _random_variables(model, 224, seed=1)
    sd = weights.backbone_state_dict(_as_state(variables), 'resnet')
    specs = backbone_module('resnet').torch_models('50', img_size=224, in_chans=3, layout=None)
    assert specs[0] == {
        'library': 'timm',
        'model_name': 'resnet50',
        'kwargs': {'in_chans': 3, 'num_classes': 0},
        'features': specs[0]['features'],
    }
    assert specs[1]['library'] == 'torchvision' and specs[1]['model_name'] == 'resnet50'
    assert specs[1]['missing_keys'] == ['fc.bias', 'fc.weight']
    timm_model = _load_checked(specs[0], sd)  # strict: nothing missing, nothing unexpected
    tv_model = _load_checked(specs[1], sd)  # only fc.* missing
    x = _input(224, seed=2, batch=1)
    ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
    for spec, m in zip(specs, (timm_model, tv_model)):
        err = float(np.abs(ours - torch_features(m, spec, x)).max())
        print(
            f'resnet50 {spec["library"]} 224px: max |jax - torch| = {err:.2e} '
            f'(max |feature| {np.abs(ours).max():.2f})'
        )
        assert err < PARITY_TOL * max(1.0, np.abs(ours).max())


def test_vit_b16_export_loads_into_timm_strict():
    model = build_backbone('vit', 'B/16', img_size=224)
    variables = _random_variables(model, 224, seed=3)
    sd = weights.backbone_state_dict(_as_state(variables), 'vit')
    (spec,) = backbone_module('vit').torch_models('B/16', img_size=224, in_chans=3, layout=None)
    assert spec['model_name'] == 'vit_base_patch16_224'
    timm_model = _load_checked(spec, sd)
    assert len(sd) == 150
    x = _input(224, seed=4, batch=1)
    ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
    err = float(np.abs(ours - torch_features(timm_model, spec, x)).max())
    print(f'vit B/16 224px: max |jax - torch| = {err:.2e} (max |feature| {np.abs(ours).max():.2f})')
    assert err < PARITY_TOL


def test_swin_export_loads_into_timm_strict():
    model = build_backbone('swin', 'nano', img_size=64)
    variables = _random_variables(model, 64, seed=5)
    sd = weights.backbone_state_dict(_as_state(variables), 'swin')  # timm layout by default
    (spec,) = backbone_module('swin').torch_models('nano', img_size=64, in_chans=3, layout=None)
    timm_model = _load_checked(spec, sd)
    x = _input(64, seed=6)
    ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
    err = float(np.abs(ours - torch_features(timm_model, spec, x)).max())
    print(f'swin nano 64px: max |jax - torch| = {err:.2e} (max |feature| {np.abs(ours).max():.2f})')
    assert err < PARITY_TOL
    # The official (mmcls) layout is the one inside a full CMID checkpoint.
    mmcls = weights.backbone_state_dict(_as_state(variables), 'swin', layout='mmcls')
    assert 'stages.0.downsample.reduction.weight' in mmcls and 'norm3.weight' in mmcls
    assert not any(k.startswith('layers.') for k in mmcls)
