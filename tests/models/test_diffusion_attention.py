"""GenserveAttnProcessor against diffusers' AttnProcessor2_0: single attention modules of every kind
AttnProcessor2_0 handles, and a tiny random UNet, on the SDPA path and (Triton's interpreter on CPU)
the kernel's."""

from __future__ import annotations

import copy
import logging
from types import ModuleType, SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from genserve.kernels import attention as kernel_attention
from genserve.models.diffusion.attention import GenserveAttnProcessor, use_genserve_attention
from tests.kernels.conftest import DEVICE, HAS_CUDA, _triton_module  # sets TRITON_INTERPRET=1 without CUDA

# SDPA and the processor's SDPA path are one call; the kernel sums in another order (and on CUDA
# the UNet's convolutions run in TF32, which magnifies that).
ATOL = {"sdpa": 1e-5, "triton": 1e-2 if HAS_CUDA else 1e-4}


@pytest.fixture
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``sdpa``: as on CPU; ``triton``: dense_attention takes the kernel, in the interpreter on CPU."""
    if request.param == "triton":
        _triton_module("genserve.kernels._triton_attention")
        if not HAS_CUDA:
            monkeypatch.setattr(kernel_attention, "use_triton", lambda _x: True)
    elif HAS_CUDA:
        monkeypatch.setattr(kernel_attention, "use_triton", lambda _x: False)
    return request.param


PATHS = pytest.mark.parametrize("path", ["sdpa", "triton"], indirect=True)


def tiny_unet(sample_size: int = 16) -> UNet2DConditionModel:
    """Attention at 32 channels in 2 heads: head size 16, the kernel's smallest."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, cross_attention_dim=24, attention_head_dim=2).eval()


def unet_inputs(batch: int = 2, size: int = 16, text_tokens: int = 7) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"sample": torch.randn(batch, 3, size, size, generator=g).to(DEVICE),
            "timestep": torch.tensor([10, 700][:batch], device=DEVICE),
            "encoder_hidden_states": torch.randn(batch, text_tokens, 24, generator=g).to(DEVICE)}


@torch.no_grad()
@PATHS
def test_unet_output_is_unchanged(path: str):
    unet = tiny_unet().to(DEVICE)
    ours = copy.deepcopy(unet)
    assert use_genserve_attention(ours) == 8  # attn1 and attn2 of 4 transformer blocks
    inputs = unet_inputs()
    expected = unet(**inputs).sample
    torch.testing.assert_close(ours(**inputs).sample, expected, atol=ATOL[path], rtol=0)


def test_replaces_every_attn_processor2_0_of_the_denoisers(caplog: pytest.LogCaptureFixture):
    unet = tiny_unet()
    names = [name for name, m in unet.named_modules() if isinstance(m, Attention)]
    assert len(names) == len(unet.attn_processors) == 8
    unet.get_submodule(names[0]).set_processor(AttnProcessor())  # another kind of processor is kept
    pipe = SimpleNamespace(unet=unet, transformer=None, vae=tiny_unet())  # a pipeline: only its denoisers
    with caplog.at_level(logging.INFO, logger="genserve.models.diffusion.attention"):
        assert use_genserve_attention(pipe) == 7
    assert "1 x AttnProcessor" in caplog.text
    kinds = [type(unet.get_submodule(name).processor) for name in names]
    assert kinds == [AttnProcessor] + [GenserveAttnProcessor] * 7
    assert all(type(p) is AttnProcessor2_0 for p in pipe.vae.attn_processors.values())
    assert use_genserve_attention(pipe) == 0  # nothing left to replace


# Attention modules as diffusers builds them: UNet cross-attention with a normed context, VAE
# mid-block attention over a 4-D map, MoVQ spatial norm, q/k layer norms, and head size 32 in 1 head.
MODULES = {
    "cross": ({"query_dim": 32, "cross_attention_dim": 24, "heads": 2, "dim_head": 16,
               "cross_attention_norm": "layer_norm"}, (2, 40, 32), (2, 7, 24)),
    "vae": ({"query_dim": 32, "heads": 2, "dim_head": 16, "norm_num_groups": 8, "residual_connection": True,
             "rescale_output_factor": 2.0, "bias": True, "upcast_softmax": True}, (2, 32, 5, 7), None),
    "spatial": ({"query_dim": 32, "heads": 2, "dim_head": 16, "spatial_norm_dim": 4, "residual_connection": True,
                 "bias": True}, (2, 32, 6, 6), None),
    "qk_norm": ({"query_dim": 32, "heads": 1, "dim_head": 32, "qk_norm": "layer_norm"}, (2, 33, 32), None),
}


@torch.no_grad()
@PATHS
@pytest.mark.parametrize("kind", list(MODULES))
def test_attention_module_matches_attn_processor2_0(path: str, kind: str):
    kwargs, x_shape, ctx_shape = MODULES[kind]
    torch.manual_seed(0)
    attn = Attention(**kwargs).to(DEVICE).eval()
    for p in attn.parameters():  # nonzero biases and norm affines, unlike their initialisation
        p.add_(0.1 * torch.randn_like(p))
    assert type(attn.processor) is AttnProcessor2_0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(x_shape, generator=g).to(DEVICE)
    extra = {"encoder_hidden_states": torch.randn(ctx_shape, generator=g).to(DEVICE)} if ctx_shape else {}
    if kind == "spatial":
        extra["temb"] = torch.randn(2, 4, 3, 3, generator=g).to(DEVICE)
    expected = attn(x, **extra)
    attn.set_processor(GenserveAttnProcessor())
    torch.testing.assert_close(attn(x, **extra), expected, atol=ATOL[path], rtol=0)


@torch.no_grad()
def test_attention_mask_falls_back_to_sdpa():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16).eval()
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 10, 32, generator=g), torch.randn(2, 7, 24, generator=g)
    mask = torch.zeros(2, 1, 7)
    mask[0, :, 4:] = -torch.inf  # the first row's last 3 text tokens are padding
    expected = attn(x, ctx, attention_mask=mask)
    attn.set_processor(GenserveAttnProcessor())
    out = attn(x, ctx, attention_mask=mask)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0], attn(x[:1], ctx[:1, :4])[0], atol=1e-6, rtol=0)  # padding unseen
    torch.testing.assert_close(out[1], attn(x, ctx)[1], atol=1e-6, rtol=0)


def test_triton_path_runs_the_kernel(monkeypatch: pytest.MonkeyPatch):
    triton_attention: ModuleType = _triton_module("genserve.kernels._triton_attention")
    if not HAS_CUDA:
        monkeypatch.setattr(kernel_attention, "use_triton", lambda _x: True)
    calls = []
    launch = triton_attention.dense_attention_triton
    monkeypatch.setattr(triton_attention, "dense_attention_triton", lambda *a: calls.append(a[0].shape) or launch(*a))
    unet = tiny_unet(sample_size=8).to(DEVICE)
    use_genserve_attention(unet)
    with torch.no_grad():
        unet(**unet_inputs(batch=1, size=8, text_tokens=5))
    assert sorted(set(calls)) == [(1, 2, 16, 16)]  # (B, heads, 4 x 4 positions, head size 16), all 8 modules
    assert len(calls) == 8


@pytest.mark.parametrize("attention", ["sdpa", "genserve"])
def test_registry_attention_is_set_before_the_runner_probes(monkeypatch: pytest.MonkeyPatch, attention: str):
    from genserve.app.backends import local_image
    from genserve.app.metrics import Metrics
    from genserve.app.registry import ModelEntry
    from genserve.models.diffusion import runner as diffusion_runner

    seen: list[str] = []

    class Runner:  # DiffusionRunner's stand-in: its batch-invariance probe must run the chosen attention
        def __init__(self, pipe, _max_rows: int) -> None:
            seen.extend({type(p).__name__ for p in pipe.unet.attn_processors.values()})

    monkeypatch.setattr(diffusion_runner, "DiffusionRunner", Runner)
    entry = ModelEntry(id="d", modality="image", backend="local", family="diffusers", source="d", max_batch_size=2,
                       attention=attention)
    backend = local_image.LocalImageBackend(entry, Metrics())
    monkeypatch.setattr(backend, "load_model", lambda: SimpleNamespace(unet=tiny_unet(), scheduler=None))
    backend.setup()
    assert seen == ["GenserveAttnProcessor" if attention == "genserve" else "AttnProcessor2_0"]
