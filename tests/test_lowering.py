"""The full train step lowers for NVIDIA GPUs and TPUs from this CPU machine, attention resolved per
platform: cuDNN fused attention for the bf16 ViT on 'cuda', XLA's everywhere else.

Lowering emits StableHLO and stops before any backend compiler, so no accelerator is needed. The
inputs are abstract (`jax.ShapeDtypeStruct`) on one device.
"""

import jax
import pytest

from cmid_jax import optim
from cmid_jax.config_resolve import resolve
from cmid_jax.models import attention
from cmid_jax.perf.synthetic import synthetic_batch
from cmid_jax.step import TrainStep
from configs import resnet50, swinb, vitb

CUDNN_CALL = '__cudnn$fmha'


@pytest.fixture
def cudnn_version_for_lowering(monkeypatch):
    """jax asks the installed cuDNN for its version while tracing the fused attention; a CPU jaxlib
    has none. The jax CUDA plugin would bring it, but its PJRT half makes every jax import on a
    GPU-less machine print a failed CUDA initialisation, so the probe answers 9.10 instead; the
    lowering itself only writes the custom call."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, 'check_cudnn_version', lambda: 91000)


def lowered_step_text(config_module, platform: str, **model) -> tuple[str, TrainStep]:
    config = config_module.get_config('smoke')
    config.model.compute_dtype = 'bfloat16'  # The recipes' dtype; cuDNN attention needs it.
    config.model.update(model)
    trainer = TrainStep.create(resolve(config), optim.Schedule(10, 4), platform=platform)
    batch = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
        synthetic_batch(0, 8, config.data.image_size),
    )
    lowered = (
        jax.jit(trainer, donate_argnums=(0,))
        .trace(trainer.abstract_state, batch)
        .lower(lowering_platforms=(platform,))
    )
    return lowered.as_text(), trainer


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
@pytest.mark.parametrize('config_module', [vitb, resnet50, swinb], ids=['vit', 'resnet', 'swin'])
def test_train_step_lowers_for_gpu_and_tpu(config_module, platform, cudnn_version_for_lowering):
    text, trainer = lowered_step_text(config_module, platform, remat='dots')
    assert 'func.func public @main' in text
    fused = config_module is vitb and platform == 'cuda'
    assert getattr(trainer.nets.backbone, 'attention_impl', 'xla') == ('cudnn' if fused else 'xla')
    # Forward and backward kernels, for the student's and the teacher's calls.
    assert (text.count(CUDNN_CALL) >= 2) == fused and (CUDNN_CALL in text) == fused


def test_auto_attention_falls_back_to_xla_where_cudnn_cannot_run():
    resolve = attention.resolve
    assert resolve('auto', platform='cuda', dtype='bfloat16', head_dim=64) == 'cudnn'
    assert resolve('auto', platform='cuda', dtype='float32', head_dim=64) == 'xla'
    assert resolve('auto', platform='cuda', dtype='bfloat16', head_dim=20) == 'xla'
    for platform in ('tpu', 'cpu', 'rocm'):
        assert resolve('auto', platform=platform, dtype='bfloat16', head_dim=64) == 'xla'
    assert resolve('xla', platform='cuda', dtype='bfloat16', head_dim=64) == 'xla'
    assert attention.current_platform() == 'cpu'


def test_cudnn_where_it_cannot_run_fails_before_tracing():
    with pytest.raises(
        ValueError,
        match=r"model.attention_impl='cudnn' cannot run: it needs an "
        r'NVIDIA GPU \(platform cuda\), not tpu',
    ):
        lowered_step_text(vitb, 'tpu', attention_impl='cudnn')
    with pytest.raises(ValueError, match=r"'cudnn' cannot run: .*bfloat16 or float16, not float32"):
        attention.resolve('cudnn', platform='cuda', dtype='float32', head_dim=64)
    with pytest.raises(ValueError, match=r"model.attention_impl='flash'; expected one of"):
        attention.resolve('flash', platform='cuda', dtype='bfloat16', head_dim=64)
