"""Int4 weight-only linear: the packed format, quantization error, every int4_linear route against
the dequantized reference, the module swap on a small model with a tied weight, and the memory it saves."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from torch import nn

import genserve.kernels.int4 as int4
from genserve.kernels.int4 import (
    Int4Linear,
    dequantize_int4,
    int4_linear,
    quantize_int4,
    quantize_linears_int4,
    reference_int4_linear,
)
from tests.kernels.conftest import BF16_NEEDS_GPU, DEVICE

# Largest |y - reference| / max |reference|: fp32 routes differ only in summation order, half
# precision ones also round the output (and bf16 the dequantized weight) to 8 or 11 bits.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def problem(m: int, k: int, n: int, group_size: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qweight, scales, zeros = quantize_int4(torch.randn(n, k, generator=g), group_size)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, qweight, scales, zeros, b


def assert_matches_reference(y: torch.Tensor, x, qweight, scales, zeros, group_size, bias) -> None:
    ref = reference_int4_linear(x.cpu(), qweight.cpu(), scales.cpu(), zeros.cpu(), group_size,
                                None if bias is None else bias.cpu()).float()
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], qweight.shape[0])
    err = (y.float().cpu() - ref).abs().max() / ref.abs().max()
    assert err <= RTOL[x.dtype], f"relative error {err:.2e} > {RTOL[x.dtype]:.0e}"


def test_packing_puts_even_k_in_the_low_nibble():
    weight = torch.arange(16.0).repeat(2, 1)  # one group of 16 per row: scale 1, zero-point 0, q = k
    weight[1] -= 5  # -5..10: scale 1, zero-point 5, the same q
    qweight, scales, zeros = quantize_int4(weight, group_size=16)
    assert qweight.shape == (2, 8) and qweight.dtype == torch.uint8
    assert qweight[0].tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]
    assert torch.equal(qweight[1], qweight[0])
    assert scales.tolist() == [[1.0], [1.0]] and zeros.tolist() == [[0], [5]]
    assert torch.equal(dequantize_int4(qweight, scales, zeros, 16), weight)


def test_quantize_int4_error_is_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.logspace(-3, 1, 64)[:, None]
    w[5] = 0.0
    w[6, :32] = w[6, :32].abs() + 1  # a group of positive weights only, and one of negative ones
    w[7, 32:64] = -w[7, 32:64].abs()
    w[8, 3] = 0.0
    qweight, scales, zeros = quantize_int4(w, group_size=32)
    assert scales.dtype == torch.float32 and scales.shape == (64, 8) and torch.isfinite(scales).all()
    assert zeros.dtype == torch.uint8 and zeros.shape == (64, 8) and zeros.max() <= 15
    deq = dequantize_int4(qweight, scales, zeros, 32)
    assert (deq[5] == 0).all() and deq[8, 3] == 0  # zero is on every group's grid
    err = (deq - w).abs().view(64, 8, 32)
    assert (err <= scales[..., None] / 2 * (1 + 1e-5)).all()
    # min..max spans the 16 levels: a group's range is 15 steps, or 15 steps to 0 for one-signed groups.
    span = torch.maximum(w.view(64, 8, 32).amax(-1), torch.zeros(())) - torch.minimum(w.view(64, 8, 32).amin(-1),
                                                                                       torch.zeros(()))
    torch.testing.assert_close(scales[torch.arange(64) != 5], span[torch.arange(64) != 5] / 15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=BF16_NEEDS_GPU)])
@pytest.mark.parametrize(("m", "k", "n", "group_size", "bias"), [
    (1, 128, 40, 64, False),
    (5, 96, 33, 32, True),
    (37, 128, 20, 16, True),  # rows past one block of 16
    (3, 36, 10, 6, True),  # K past one tile of 32, a group that is no power of 2
])
def test_triton_kernel_matches_reference(triton_int4: ModuleType, m, k, n, group_size, bias, dtype):
    x, qweight, scales, zeros, b = (t if t is None else t.to(DEVICE)
                                    for t in problem(m, k, n, group_size, dtype, bias))
    y = triton_int4.int4_linear_triton(x, qweight, scales, zeros, group_size, b)
    assert_matches_reference(y, x, qweight, scales, zeros, group_size, b)
    cpu = int4_linear(*(t if t is None else t.cpu() for t in (x, qweight, scales, zeros)), group_size,
                      None if b is None else b.cpu()).float()
    torch.testing.assert_close(y.float().cpu(), cpu, atol=2 * RTOL[dtype] * cpu.abs().max().item(), rtol=0)


@pytest.mark.parametrize(("m", "k", "n", "group_size", "dtype", "route"), [
    (3, 128, 48, 64, torch.bfloat16, "pack"),  # few bf16 rows, a group size and N the pack kernel takes
    (32, 64, 32, 32, torch.bfloat16, "pack"),
    (33, 64, 32, 32, torch.bfloat16, "chunked"),  # more rows than the pack kernel wins on
    (3, 96, 40, 32, torch.bfloat16, "chunked"),  # N not a multiple of 16
    (3, 48, 32, 16, torch.bfloat16, "chunked"),  # a group size the pack kernel lacks
    (3, 128, 50, 64, torch.float32, "chunked"),
    (40, 96, 50, 32, torch.float32, "chunked"),
    (3, 64, 50, 16, torch.float16, "chunked"),
])
def test_cpu_routes_match_reference(monkeypatch: pytest.MonkeyPatch, m, k, n, group_size, dtype, route):
    x, qweight, scales, zeros, b = problem(m, k, n, group_size, dtype, bias=True)
    module = Int4Linear(k, n, bias=True, group_size=group_size)
    module.qweight, module.scales, module.zeros, module.bias = qweight, scales, zeros, b
    assert int4._pack_mm_applies(x, qweight, group_size) == (route == "pack")
    monkeypatch.setattr(int4, "_DEQUANT_CHUNK_BYTES", 7 * k * 4)  # n rows in float32 slices of 7
    assert_matches_reference(module(x), x, qweight, scales, zeros, group_size, b)
    assert_matches_reference(int4_linear(x, qweight, scales, zeros, group_size, b), x, qweight, scales, zeros,
                             group_size, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_keeps_leading_dims_and_rejects_mismatches(dtype):
    x, qweight, scales, zeros, b = problem(6, 64, 32, 32, dtype, bias=True)
    module = Int4Linear(64, 32, bias=True, group_size=32)
    module.qweight, module.scales, module.zeros, module.bias = qweight, scales, zeros, b
    for x3d in (x.view(2, 3, 64), x[:1].view(1, 1, 64)):
        y = module(x3d)
        assert y.shape == (*x3d.shape[:-1], 32)
        torch.testing.assert_close(y.view(-1, 32), module(x3d.reshape(-1, 64)), atol=0, rtol=0)
    assert int4_linear(x[:0], qweight, scales, zeros, 32, b).shape == (0, 32)
    with pytest.raises(ValueError, match=r"uint8 \(N, 31\)"):
        int4_linear(x[:, :62], qweight, scales, zeros, 31 * 2)
    with pytest.raises(ValueError, match=r"qweight must be uint8"):
        int4_linear(x, qweight.to(torch.int8), scales, zeros, 32)
    with pytest.raises(ValueError, match=r"scales must be a float \(32, 2\) tensor, got torch.float32 \(32, 1\)"):
        int4_linear(x, qweight, scales[:, :1], zeros, 32)
    with pytest.raises(ValueError, match=r"zeros must be a uint8 \(32, 2\) tensor, got torch.int64"):
        int4_linear(x, qweight, scales, zeros.long(), 32)
    with pytest.raises(ValueError, match=r"in_features must be a multiple of group_size 48, got 64"):
        int4_linear(x, qweight, scales, zeros, 48)
    with pytest.raises(ValueError, match=r"x must be one of .*got torch.int32"):
        int4_linear(x.int(), qweight, scales, zeros, 32)


def test_bad_group_sizes_are_rejected_with_their_value():
    with pytest.raises(ValueError, match=r"in_features must be a multiple of group_size 64, got 100"):
        quantize_int4(torch.randn(4, 100))
    with pytest.raises(ValueError, match=r"positive even int, got 5"):
        quantize_int4(torch.randn(4, 100), group_size=5)
    with pytest.raises(ValueError, match=r"positive even int, got 0"):
        Int4Linear(64, 8, group_size=0)
    with pytest.raises(ValueError, match=r"positive even int, got 7"):
        quantize_linears_int4(nn.Sequential(nn.Linear(14, 4)), group_size=7)
    with pytest.raises(ValueError, match=r"2-D float tensor, got \(4, 8, 2\)"):
        quantize_int4(torch.randn(4, 8, 2))


def test_int4_module_is_a_linear_at_an_eighth_of_the_memory():
    torch.manual_seed(0)
    linear = nn.Linear(256, 688, bias=True)
    module = Int4Linear.from_linear(linear, group_size=64)
    x = torch.randn(3, 7, 256)
    y, expected = module(x), linear(x)
    assert (y - expected).abs().max() / expected.abs().max() < 0.1  # 16 levels' error, not a bug's size
    int4_bytes = module.qweight.nbytes + module.scales.nbytes + module.zeros.nbytes
    assert linear.weight.nbytes / int4_bytes >= 6
    # The buffers are the whole state: a fresh module loading them computes the same thing, on the
    # pack route too, whose converted weight it built from its own (zero) buffers before the load.
    x_bf16 = x[0].bfloat16()
    clone = Int4Linear(256, 688, bias=True)
    assert int4._pack_mm_applies(x_bf16, clone.qweight, 64) and (clone(x_bf16) == 0).all()
    clone.load_state_dict(module.state_dict())
    torch.testing.assert_close(clone(x), y, atol=0, rtol=0)
    torch.testing.assert_close(clone(x_bf16), module(x_bf16), atol=0, rtol=0)
    assert_matches_reference(clone(x_bf16), x_bf16, module.qweight, module.scales, module.zeros, 64, module.bias)


class TinyLM(nn.Module):
    """Embedding, a few linears (one of them with in_features no group divides), a tied head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(96, 64)
        self.body = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 48), nn.GELU(), nn.Linear(48, 64))
        self.out_proj = nn.Linear(64, 64, bias=False)
        self.lm_head = nn.Linear(64, 96, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.out_proj(self.body(self.embed(ids))))


def test_quantize_linears_swaps_untied_divisible_layers_and_keeps_the_logits():
    torch.manual_seed(0)
    model = TinyLM().eval()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids)
        assert quantize_linears_int4(model, group_size=32) == 3  # body.0, body.2 and out_proj
        after = model(ids)
    assert isinstance(model.body[0], Int4Linear) and isinstance(model.body[2], Int4Linear)
    assert isinstance(model.out_proj, Int4Linear) and model.out_proj.group_size == 32
    assert type(model.body[4]) is nn.Linear  # in_features 48 is not a multiple of 32
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed.weight  # tied
    assert (after - before).abs().max() / before.abs().max() < 0.1


def test_quantize_linears_leaves_skipped_layers_in_float():
    model = TinyLM()
    assert quantize_linears_int4(model, skip=lambda name, _: name == "out_proj", group_size=16) == 3
    assert type(model.out_proj) is nn.Linear
    assert all(isinstance(model.body[i], Int4Linear) for i in (0, 2, 4))  # 48 is a multiple of 16


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 32, 300])
def test_bf16_cuda_kernel_matches_reference(m):
    x, qweight, scales, zeros, b = (t.cuda() for t in problem(m, 2048, 8192, 64, torch.bfloat16, bias=True))
    y = int4_linear(x, qweight, scales, zeros, 64, b)  # the Triton route for CUDA tensors
    assert_matches_reference(y, x, qweight, scales, zeros, 64, b)
