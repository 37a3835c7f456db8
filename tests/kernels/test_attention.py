"""Prefill, decode and dense attention: Triton kernels and the PyTorch path against the fp32 reference."""

from __future__ import annotations

from itertools import pairwise
from types import ModuleType

import pytest
import torch

import genserve.kernels.attention as attention
from genserve.kernels.attention import (
    _decode_sdpa,
    _prefill_sdpa,
    decode_attention,
    dense_attention,
    prefill_attention,
    reference_attention,
    reference_dense_attention,
)
from tests.kernels.conftest import BF16_NEEDS_GPU, DEVICE

# Largest |out - reference| allowed, the reference computed in fp32 from the same rounded inputs.
ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=BF16_NEEDS_GPU)]
# fp16/bf16 SDPA on CPU is a fallback path, slower but as exact; the tests only need agreement.
TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def packed_prompts(lens: tuple[int, ...], hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, d, generator=g).to(DEVICE, dtype) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return q, k, v, cu


def prefill_reference(q, k, v, cu, scale=None) -> torch.Tensor:
    bounds = cu.tolist()
    return torch.cat([reference_attention(q[a:b], k[a:b], v[a:b], scale=scale) for a, b in pairwise(bounds)
                      if b > a]).float()


def paged_cache(context_lens: list[int], hkv: int, d: int, dtype: torch.dtype, block_size: int = 16,
                spare_blocks: int = 3, seed: int = 0):
    """A cache whose blocks are handed out in shuffled order; table entries past a sequence's last
    block point at block 0, and every slot no sequence owns holds large values that must be masked."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(need) + spare_blocks
    k_cache = torch.full((num_blocks, block_size, hkv, d), 1e3)
    v_cache = torch.full((num_blocks, block_size, hkv, d), 1e3)
    order = torch.randperm(num_blocks - 1, generator=g) + 1  # block 0 stays unowned
    tables = torch.zeros(len(context_lens), max(need) + 1, dtype=torch.int32)
    used = 0
    for b, (n, nb) in enumerate(zip(context_lens, need, strict=True)):
        tables[b, :nb] = order[used:used + nb]
        used += nb
        for pos in range(n):
            blk, slot = int(tables[b, pos // block_size]), pos % block_size
            k_cache[blk, slot] = torch.randn(hkv, d, generator=g)
            v_cache[blk, slot] = torch.randn(hkv, d, generator=g)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return k_cache.to(DEVICE, dtype), v_cache.to(DEVICE, dtype), tables.to(DEVICE), lens.to(DEVICE)


def decode_reference(q, k_cache, v_cache, tables, lens, scale=None) -> torch.Tensor:
    """Reads each sequence's tokens one position at a time, independently of both implementations."""
    block_size = k_cache.shape[1]
    rows = []
    for b, n in enumerate(lens.tolist()):
        where = [(int(tables[b, p // block_size]), p % block_size) for p in range(n)]
        k = torch.stack([k_cache[blk, slot] for blk, slot in where])  # (n, Hkv, D)
        v = torch.stack([v_cache[blk, slot] for blk, slot in where])  # (n, Hkv, D)
        rows.append(reference_attention(q[b:b + 1], k, v, scale=scale, causal=False))
    return torch.cat(rows).float()


PREFILL_CASES = [((1, 17, 40), 4, 2), ((16, 0, 33), 4, 1), ((23,), 2, 2)]
DECODE_LENS = [1, 16, 17, 50]


@pytest.mark.parametrize("d", [32, 64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("lens", "hq", "hkv"), PREFILL_CASES)
def test_prefill_triton_matches_reference_and_torch_path(triton_attention: ModuleType, lens, hq, hkv, d, dtype):
    q, k, v, cu = packed_prompts(lens, hq, hkv, d, dtype)
    out = triton_attention.prefill_attention_triton(q, k, v, cu, max(lens), d ** -0.5)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), prefill_reference(q, k, v, cu), atol=ATOL[dtype], rtol=0)
    torch.testing.assert_close(out.float(), _prefill_sdpa(q, k, v, cu, d ** -0.5).float(), atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize(("lens", "hq", "hkv"), PREFILL_CASES)
def test_prefill_torch_path_matches_reference(lens, hq, hkv, dtype):
    q, k, v, cu = packed_prompts(lens, hq, hkv, 32, dtype)
    out = _prefill_sdpa(q, k, v, cu, 32 ** -0.5)
    torch.testing.assert_close(out.float(), prefill_reference(q, k, v, cu), atol=ATOL[dtype], rtol=0)


def test_prefill_is_causal_and_sequences_do_not_mix():
    q, k, v, cu = packed_prompts((5, 7), 2, 2, 16, torch.float32)
    base = prefill_attention(q, k, v, cu, 7)
    k2, v2 = k.clone(), v.clone()
    k2[8:], v2[8:] = 0.0, 5.0  # the second prompt's last 4 tokens
    out = prefill_attention(q, k2, v2, cu, 7)
    torch.testing.assert_close(out[:8], base[:8], atol=0, rtol=0)  # the first prompt and the earlier tokens
    assert not torch.allclose(out[8:], base[8:])


def test_prefill_scale_is_used():
    q, k, v, cu = packed_prompts((9, 4), 4, 2, 32, torch.float32)
    out = prefill_attention(q, k, v, cu, 9, scale=0.3)
    torch.testing.assert_close(out, prefill_reference(q, k, v, cu, scale=0.3), atol=1e-4, rtol=0)
    assert not torch.allclose(out, prefill_attention(q, k, v, cu, 9))


@pytest.mark.parametrize("d", [32, 64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_triton_matches_reference_and_torch_path(triton_attention: ModuleType, d, dtype, num_splits):
    k_cache, v_cache, tables, lens = paged_cache(DECODE_LENS, 2, d, dtype)
    q = torch.randn(len(DECODE_LENS), 4, d, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out = triton_attention.decode_attention_triton(q, k_cache, v_cache, tables, lens, d ** -0.5, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), decode_reference(q, k_cache, v_cache, tables, lens),
                               atol=ATOL[dtype], rtol=0)
    torch.testing.assert_close(out.float(), _decode_sdpa(q, k_cache, v_cache, tables, lens, d ** -0.5).float(),
                               atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("one_sequence_per_gather", [False, True])
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize(("hq", "hkv"), [(4, 2), (8, 1), (3, 3)])
def test_decode_torch_path_matches_reference(monkeypatch: pytest.MonkeyPatch, hq, hkv, dtype,
                                             one_sequence_per_gather):
    if one_sequence_per_gather:
        monkeypatch.setattr(attention, "_DECODE_GATHER_BYTES", 1)
    k_cache, v_cache, tables, lens = paged_cache(DECODE_LENS, hkv, 32, dtype)
    q = torch.randn(len(DECODE_LENS), hq, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out = decode_attention(q, k_cache, v_cache, tables, lens, scale=0.2)
    torch.testing.assert_close(out.float(), decode_reference(q, k_cache, v_cache, tables, lens, scale=0.2),
                               atol=ATOL[dtype], rtol=0)


def test_decode_equals_last_row_of_prefill():
    """The engine's invariant: decoding token n over a cache of n tokens gives prefill's row n."""
    n, hq, hkv, d = 21, 4, 2, 32
    q, k, v, cu = packed_prompts((n,), hq, hkv, d, torch.float32)
    k_cache, v_cache = k.view(-1, 7, hkv, d), v.view(-1, 7, hkv, d)  # (3, 7, Hkv, D): blocks 0, 1, 2 in order
    tables = torch.tensor([[0, 1, 2]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([n], dtype=torch.int32, device=DEVICE)
    out = decode_attention(q[-1:], k_cache, v_cache, tables, lens)
    torch.testing.assert_close(out, prefill_attention(q, k, v, cu, n)[-1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("change", "message"), [
    (lambda a: {**a, "k": a["k"][:, :1].expand(-1, 3, -1), "v": a["v"][:, :1].expand(-1, 3, -1)}, "multiple"),
    (lambda a: {**a, "cu_seqlens": a["cu_seqlens"].long()}, "int32"),
    (lambda a: {**a, "cu_seqlens": a["cu_seqlens"][:-1]}, "rise from 0 to 10"),
    (lambda a: {**a, "v": a["v"].double()}, "float64"),
])
def test_prefill_rejects_bad_inputs(change, message):
    q, k, v, cu = (t.cpu() for t in packed_prompts((4, 6), 4, 2, 16, torch.float32))  # cu_seqlens is read on CPU
    args = change({"q": q, "k": k, "v": v, "cu_seqlens": cu, "max_seqlen": 6})
    with pytest.raises(ValueError, match=message):
        prefill_attention(**args)


def test_decode_rejects_empty_context_and_short_tables():
    k_cache, v_cache, tables, lens = paged_cache([3, 5], 2, 16, torch.float32)
    q = torch.randn(2, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"got 0\.\.5"):
        _decode_sdpa(q, k_cache, v_cache, tables, torch.tensor([0, 5], dtype=torch.int32, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="int32 with 2 rows"):
        decode_attention(q, k_cache, v_cache, tables[:1], lens)
    with pytest.raises(ValueError, match=r"lie in 1\.\.32"):
        _decode_sdpa(q, k_cache, v_cache, tables, torch.tensor([3, 33], dtype=torch.int32, device=DEVICE), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_prefill_bf16_cuda_matches_sdpa(d):
    lens, hq, hkv = (1, 300, 1024, 77), 32, 8
    q, k, v, cu = packed_prompts(lens, hq, hkv, d, torch.bfloat16)
    out = prefill_attention(q, k, v, cu, max(lens))
    expected = _prefill_sdpa(q, k, v, cu, d ** -0.5)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=0)


@pytest.mark.gpu
def test_decode_bf16_cuda_splits_long_contexts():
    lens = [1, 700, 2048, 1500]
    k_cache, v_cache, tables, ctx = paged_cache(lens, 8, 128, torch.bfloat16)
    q = torch.randn(len(lens), 32, 128, device=DEVICE, dtype=torch.bfloat16)
    out = decode_attention(q, k_cache, v_cache, tables, ctx)  # default splits: several per sequence on a GPU
    expected = _decode_sdpa(q, k_cache, v_cache, tables, ctx, 128 ** -0.5)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=0)


def dense_inputs(lq: int, lk: int, d: int, dtype: torch.dtype, b: int = 2, h: int = 3, seed: int = 0):
    """q, k, v as diffusers makes them: (B, L, H, D) projections viewed as (B, H, L, D) by a transpose."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, h, d, generator=g).to(DEVICE, dtype).transpose(1, 2) for n in (lq, lk, lk))


# (Lq, Lk): self-attention over lengths that are no multiple of a block, cross-attention both ways.
DENSE_CASES = [(33, 33), (40, 7), (7, 40)]


@pytest.mark.parametrize("d", [16, 32, 64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("lq", "lk"), DENSE_CASES)
def test_dense_triton_matches_reference_and_torch_path(triton_attention: ModuleType, lq, lk, d, dtype):
    q, k, v = dense_inputs(lq, lk, d, dtype)
    assert not q.is_contiguous()
    out = triton_attention.dense_attention_triton(q, k, v, d ** -0.5)
    assert out.shape == (2, 3, lq, d) and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()  # heads merge without a copy
    torch.testing.assert_close(out.float(), reference_dense_attention(q, k, v).float(), atol=ATOL[dtype], rtol=0)
    torch.testing.assert_close(out.float(), dense_attention(q, k, v).float(), atol=ATOL[dtype], rtol=0)


def test_dense_triton_reads_any_layout_and_uses_scale(triton_attention: ModuleType):
    q, k, v = (t.contiguous() for t in dense_inputs(20, 17, 32, torch.float32))
    v = v.transpose(-1, -2).contiguous().transpose(-1, -2)  # a last stride that is not 1
    out = triton_attention.dense_attention_triton(q, k, v, 0.3)
    torch.testing.assert_close(out, reference_dense_attention(q, k, v, scale=0.3), atol=1e-4, rtol=0)


def test_dense_triton_rows_do_not_depend_on_their_batch(triton_attention: ModuleType):
    q, k, v = dense_inputs(24, 9, 16, torch.float32, b=3)
    batched = triton_attention.dense_attention_triton(q, k, v, 0.25)
    for i in range(3):
        alone = triton_attention.dense_attention_triton(q[i:i + 1], k[i:i + 1], v[i:i + 1], 0.25)
        torch.testing.assert_close(batched[i:i + 1], alone, atol=0, rtol=0)


def test_dense_dispatches_to_triton_for_its_head_sizes_only(triton_attention: ModuleType,
                                                            monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(attention, "use_triton", lambda _x: True)  # as for CUDA tensors
    q, k, v = dense_inputs(18, 5, 16, torch.float32)
    out = dense_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()  # the kernel's layout, not SDPA's
    torch.testing.assert_close(out, triton_attention.dense_attention_triton(q, k, v, 16 ** -0.5), atol=0, rtol=0)
    q, k, v = dense_inputs(18, 5, 8, torch.float32)  # no tl.dot below 16: SDPA
    torch.testing.assert_close(dense_attention(q, k, v), reference_dense_attention(q, k, v), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize(("lq", "lk"), DENSE_CASES)
def test_dense_torch_path_matches_reference(lq, lk, dtype):
    q, k, v = dense_inputs(lq, lk, 24, dtype)  # a head size the kernel does not take
    out = dense_attention(q, k, v, scale=0.2)
    assert out.shape == (2, 3, lq, 24) and out.dtype == dtype
    torch.testing.assert_close(out.float(), reference_dense_attention(q, k, v, scale=0.2).float(),
                               atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize(("change", "message"), [
    (lambda a: {**a, "q": a["q"][0]}, "4-D"),
    (lambda a: {**a, "v": a["v"][:, :, :3]}, "k and v shapes differ"),
    (lambda a: {**a, "k": a["k"][:1], "v": a["v"][:1]}, "same batch, heads and head size"),
    (lambda a: {**a, "k": a["k"][:, :2], "v": a["v"][:, :2]}, "same batch, heads and head size"),
    (lambda a: {**a, "k": a["k"][..., :8], "v": a["v"][..., :8]}, "same batch, heads and head size"),
    (lambda a: {**a, "k": a["k"][:, :, :0], "v": a["v"][:, :, :0]}, "at least one key"),
    (lambda a: {name: t.double() for name, t in a.items()}, "got torch.float64"),
    (lambda a: {**a, "v": a["v"].half()}, "float32, torch.float16"),
    (lambda a: {**a, "k": a["k"].to("meta")}, "one device"),
])
def test_dense_rejects_bad_inputs(change, message):
    q, k, v = dense_inputs(6, 5, 16, torch.float32)
    with pytest.raises(ValueError, match=message):
        dense_attention(**change({"q": q, "k": k, "v": v}))


@pytest.mark.gpu
@pytest.mark.parametrize(("lq", "lk"), [(4096, 77), (1024, 1024), (1000, 333)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_cuda_matches_sdpa(lq, lk, dtype):
    q, k, v = dense_inputs(lq, lk, 64, dtype, b=2, h=8)
    out = dense_attention(q, k, v)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=0)
