"""Int8 weight-only linear: quantization error, every int8_linear route against the dequantized
reference, the module swap on a real Llama, and the memory it saves."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from torch import nn

import genserve.kernels.int8 as int8
from genserve.kernels.int8 import (
    Int8Linear,
    dequantize_int8,
    int8_linear,
    quantize_int8,
    quantize_linears_int8,
    reference_int8_linear,
)
from genserve.models.llama.model import LlamaConfig, LlamaForCausalLM
from tests.kernels.conftest import BF16_NEEDS_GPU, DEVICE

# Largest |y - reference| / max |reference|: fp32 routes differ only in summation order, half
# precision ones also round the output (and bf16 the dequantized weight) to 8 or 11 bits.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def problem(m: int, k: int, n: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qweight, scales = quantize_int8(torch.randn(n, k, generator=g))
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, qweight, scales, b


def assert_matches_reference(y: torch.Tensor, x, qweight, scales, bias) -> None:
    ref = reference_int8_linear(x.cpu(), qweight.cpu(), scales.cpu(), None if bias is None else bias.cpu()).float()
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], qweight.shape[0])
    err = (y.float().cpu() - ref).abs().max() / ref.abs().max()
    assert err <= RTOL[x.dtype], f"relative error {err:.2e} > {RTOL[x.dtype]:.0e}"


def test_quantize_int8_error_is_half_a_step():
    w = torch.randn(64, 200, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 64)[:, None]
    w[5] = 0.0
    qweight, scales = quantize_int8(w)
    assert qweight.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (64,)
    assert qweight.abs().max() == 127 and torch.isfinite(scales).all()
    assert (qweight[5] == 0).all()
    # Each row's largest weight maps to +-127 exactly; the rest are within half a step.
    assert (qweight.abs().amax(dim=1)[torch.arange(64) != 5] == 127).all()
    err = (dequantize_int8(qweight, scales) - w).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=BF16_NEEDS_GPU)])
@pytest.mark.parametrize(("m", "k", "n", "bias"), [(1, 96, 40, False), (5, 72, 33, True), (37, 128, 20, True)])
def test_triton_kernel_matches_reference(triton_int8: ModuleType, m, k, n, bias, dtype):
    x, qweight, scales, b = (t if t is None else t.to(DEVICE) for t in problem(m, k, n, dtype, bias))
    y = triton_int8.int8_linear_triton(x, qweight, scales, b)
    assert_matches_reference(y, x, qweight, scales, b)
    cpu = int8._int8_linear_torch(*(t if t is None else t.cpu() for t in (x, qweight, scales, b))).float()
    torch.testing.assert_close(y.float().cpu(), cpu, atol=2 * RTOL[dtype] * cpu.abs().max().item(), rtol=0)


@pytest.mark.parametrize(("m", "k", "dtype", "route"), [
    (3, 64, torch.bfloat16, "pack"),  # few bf16 rows with K % 16 == 0
    (16, 48, torch.bfloat16, "pack"),
    (17, 64, torch.bfloat16, "chunked"),  # more rows than the pack kernel wins on
    (3, 40, torch.bfloat16, "chunked"),  # K the pack kernel's aligned loads cannot step through
    (3, 64, torch.float32, "chunked"),
    (40, 100, torch.float32, "chunked"),
    (3, 64, torch.float16, "chunked"),
])
def test_cpu_routes_match_reference(monkeypatch: pytest.MonkeyPatch, m, k, dtype, route):
    x, qweight, scales, b = problem(m, k, 50, dtype, bias=True)
    assert int8._pack_mm_applies(x, qweight) == (route == "pack")
    monkeypatch.setattr(int8, "_DEQUANT_CHUNK_BYTES", 7 * k * x.element_size())  # 50 rows in slices of 7
    assert_matches_reference(int8_linear(x, qweight, scales, b), x, qweight, scales, b)


def test_float16_survives_sums_past_its_range():
    x, qweight, scales, _ = problem(4, 512, 24, torch.float16, bias=False)
    x = x * 100  # unscaled, x @ qweight.T reaches ~127 * 100 * sqrt(512), over float16's 65504
    y = int8_linear(x, qweight, scales)
    assert torch.isfinite(y).all()
    assert_matches_reference(y, x, qweight, scales, None)


def test_pack_route_copes_with_a_misaligned_input():
    x, qweight, scales, _ = problem(4, 64, 24, torch.bfloat16, bias=False)
    shifted = torch.cat([torch.zeros(1, dtype=x.dtype), x.flatten()])[1:].view(4, 64)  # data_ptr 2 bytes off
    assert shifted.data_ptr() % 64 and int8._pack_mm_applies(shifted, qweight)
    torch.testing.assert_close(int8_linear(shifted, qweight, scales), int8_linear(x, qweight, scales), atol=0, rtol=0)


def test_int8_linear_keeps_leading_dims_and_rejects_mismatches():
    x, qweight, scales, b = problem(6, 32, 10, torch.float32, bias=True)
    y = int8_linear(x.view(2, 3, 32), qweight, scales, b)
    assert y.shape == (2, 3, 10)
    torch.testing.assert_close(y.view(6, 10), int8_linear(x, qweight, scales, b), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"int8 \(N, 31\)"):
        int8_linear(x[:, :31], qweight, scales)
    with pytest.raises(ValueError, match=r"qweight must be int8"):
        int8_linear(x, qweight.float(), scales)
    with pytest.raises(ValueError, match=r"scales must be a float \(10,\)"):
        int8_linear(x, qweight, scales[:9])


def test_int8_module_is_a_linear_at_a_quarter_of_the_memory():
    torch.manual_seed(0)
    linear = nn.Linear(256, 688, bias=True)
    module = Int8Linear.from_linear(linear)
    x = torch.randn(3, 7, 256)
    y, expected = module(x), linear(x)
    assert (y - expected).abs().max() / expected.abs().max() < 1e-2  # quantization error, not a bug's size
    int8_bytes = module.qweight.nbytes + module.scales.nbytes
    assert linear.weight.nbytes / int8_bytes >= 3.5
    # The buffers are the whole state: a fresh module loading them computes the same thing.
    clone = Int8Linear(256, 688, bias=True)
    clone.load_state_dict(module.state_dict())
    torch.testing.assert_close(clone(x), y, atol=0, rtol=0)


def tiny_llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config)
    model.init_weights()
    return model.eval()


def test_quantize_linears_swaps_every_untied_linear_and_keeps_the_logits():
    model = tiny_llama(tie=False)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids)
        assert quantize_linears_int8(model) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and lm_head
        after = model(ids)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert (after - before).abs().max() / before.abs().max() < 2e-2
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.9


def test_quantize_linears_leaves_tied_and_skipped_layers_in_float():
    model = tiny_llama(tie=True)
    count = quantize_linears_int8(model, skip=lambda name, _: name.endswith("mlp.down_proj"))
    assert count == 2 * 6  # lm_head is tied to the embedding, down_proj skipped by name
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    assert all(isinstance(layer.mlp.down_proj, nn.Linear) for layer in model.model.layers)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int8Linear)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 32, 300])
def test_bf16_cuda_kernel_matches_reference(m):
    x, qweight, scales, b = (t.cuda() for t in problem(m, 2048, 8192, torch.bfloat16, bias=True))
    y = int8_linear(x, qweight, scales, b)  # the Triton route for CUDA tensors
    assert_matches_reference(y, x, qweight, scales, b)
