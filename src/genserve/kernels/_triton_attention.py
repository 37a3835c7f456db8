"""Triton kernels behind ``kernels.attention``: varlen causal prefill, paged split-K decode and dense
(non-causal) attention.

Prefill is FlashAttention-2 (Dao, 2023, arXiv:2307.08691) laid out as in Triton's
``06-fused-attention`` tutorial: one program per (query block, query head, sequence), an online
softmax over key blocks in base 2, the blocks left of the diagonal without a mask and the diagonal
block with one. Decode follows PagedAttention (Kwon et al., 2023, arXiv:2309.06180) with
Flash-Decoding's split over the context (Dao et al., 2023): one program per (sequence, key/value
head, split) reads the split's tokens through the block table for all the query heads of its
group at once, and a second kernel merges the splits by their log-sum-exp.

Dense attention, for diffusion denoisers (self-attention over image positions, cross-attention
from them to text tokens), is the same FlashAttention-2 loop without the causal mask: one program
per (query block, batch x head) over (B, H, L, D) inputs of any strides but a unit last one, every
key block but the last unmasked and the last masked by ``cols < Lk``, so neither Lq nor Lk need
be a multiple of the blocks (query rows past Lq are computed on zeros and not stored). Its
autotuning is keyed on the head size and both lengths, not the batch, so a row's result does not
depend on the rest of its batch. The output is written (B, Lq, H, D) and returned as a
(B, H, Lq, D) view, the layout diffusers merges heads from without a copy.

Accumulation is fp32 for every input dtype; fp32 inputs multiply in IEEE fp32, not TF32. Head size
must be a power of two in 16..256 (``kernels.attention`` sends other sizes to PyTorch).

Importing this module reads ``TRITON_INTERPRET``: with it set to 1 the kernels run on CPU tensors
in Triton's interpreter, one small configuration instead of the autotuned ones.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from genserve.kernels._triton_common import INTERPRET

_INTERPRET = INTERPRET  # the tests check it
_LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N) pairs with BLOCK_M % BLOCK_N == 0, so the unmasked stage ends on a block edge.
# Few enough that the first prefill per head size compiles them all in seconds; the winner is
# cached on disk (cache_results) for the next process.
_PREFILL_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=3)
    for bm, bn in ((128, 64), (128, 32), (64, 64), (64, 32))
    for warps in (4, 8)
] if not _INTERPRET else [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
# Dense attention has no diagonal to end on, so it takes the same pairs without that constraint.
_DENSE_CONFIGS = _PREFILL_CONFIGS
# Tokens of context per decode loop step, and the shortest context a split is given.
_DECODE_BLOCK_N = 16 if _INTERPRET else 64
_DECODE_MIN_SPLIT_TOKENS = 256


@triton.jit
def _prefill_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n, lo, hi, seq_len,
                   qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Key blocks ``lo .. hi`` of the online softmax. MASKED blocks load no key at or past ``seq_len``
    and hide keys from scores: those right of the diagonal if CAUSAL (this also hides the keys past
    ``seq_len`` from every stored row), else those past ``seq_len``."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(k_ptrs + start_n * stride_kt, mask=cols[:, None] < seq_len, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kt)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            if CAUSAL:
                qk = tl.where(offs_m[:, None] >= cols[None, :], qk, float("-inf"))
            else:
                qk = tl.where(cols[None, :] < seq_len, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs + start_n * stride_vt, mask=cols[:, None] < seq_len, other=0.0)
        else:
            v = tl.load(v_ptrs + start_n * stride_vt)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_PREFILL_CONFIGS, key=["HEAD_DIM", "GROUP"], cache_results=True)
@triton.jit
def _prefill_kernel(Q, K, V, Out, cu_seqlens, qk_scale,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    seq_start = tl.load(cu_seqlens + seq).to(tl.int64)
    seq_len = (tl.load(cu_seqlens + seq + 1) - seq_start).to(tl.int32)
    if start_m * BLOCK_M >= seq_len:
        return
    kv_head = head // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < seq_len
    q = tl.load(Q + (seq_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok, other=0.0)
    k_ptrs = K + (seq_start + offs_n)[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :]
    v_ptrs = V + (seq_start + offs_n)[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Key blocks wholly left of this query block need no mask; the diagonal block needs the causal one.
    diag = start_m * BLOCK_M
    acc, l_i, m_i = _prefill_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n,
                                   0, diag, seq_len, qk_scale, False, True, BLOCK_N, PRECISION)
    acc, l_i, m_i = _prefill_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n,
                                   diag, tl.minimum(diag + BLOCK_M, seq_len), seq_len, qk_scale, True, True,
                                   BLOCK_N, PRECISION)
    acc = acc / l_i[:, None]
    tl.store(Out + (seq_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             acc.to(Out.dtype.element_ty), mask=row_ok)


@triton.autotune(configs=_DENSE_CONFIGS, key=["HEAD_DIM", "Lq", "Lk"], cache_results=True)
@triton.jit
def _dense_kernel(Q, K, V, Out, Lq, Lk, heads, qk_scale,
                  stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                  stride_ob, stride_oh, stride_om,
                  HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < Lq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok, other=0.0)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Whole key blocks need no mask; the last, partial one (if any) hides the keys past Lk.
    full = (Lk // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _prefill_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n,
                                   0, full, Lk, qk_scale, False, False, BLOCK_N, PRECISION)
    acc, l_i, m_i = _prefill_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n,
                                   full, Lk, Lk, qk_scale, True, False, BLOCK_N, PRECISION)
    acc = acc / l_i[:, None]
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             acc.to(Out.dtype.element_ty), mask=row_ok)


@triton.jit
def _decode_split_kernel(Q, K, V, block_tables, context_lens, PartialOut, PartialLse, qk_scale, block_size,
                         split_tokens, stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                         stride_vh, stride_tb, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                         GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                         PRECISION: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens + seq)
    lo = split * split_tokens
    hi = tl.minimum(lo + split_tokens, context_len)
    offs_g = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + offs_g
    head_ok = offs_g < GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    # The group's query heads are the rows of one (BLOCK_H, D) tile, padded to tl.dot's 16 rows.
    q = tl.load(Q + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=head_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        valid = tokens < hi
        block = tl.load(block_tables + seq * stride_tb + tokens // block_size, mask=valid, other=0).to(tl.int64)
        slot = tokens % block_size
        k = tl.load(K + block[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :],
                    mask=valid[:, None], other=0.0)  # (BLOCK_N, D)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_H, BLOCK_N), log2 units
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + block[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :],
                    mask=valid[:, None], other=0.0)  # (BLOCK_N, D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    # A split past the end of a short context saw no token: it leaves weight 0 (lse -inf) and zeros.
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(PartialOut + seq * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :], out,
             mask=head_ok[:, None])
    tl.store(PartialLse + seq * stride_lb + heads * stride_lh + split, lse, mask=head_ok)


@triton.jit
def _decode_merge_kernel(PartialOut, PartialLse, Out, num_splits, stride_pb, stride_ph, stride_ps, stride_lb,
                         stride_lh, stride_ob, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    split_ok = offs_s < num_splits
    lse = tl.load(PartialLse + seq * stride_lb + head * stride_lh + offs_s, mask=split_ok, other=float("-inf"))
    weight = tl.math.exp2(lse - tl.max(lse, 0))  # split 0 always saw a token, so the max is finite
    part = tl.load(PartialOut + seq * stride_pb + head * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                   mask=split_ok[:, None], other=0.0)  # (BLOCK_S, D)
    out = tl.sum(weight[:, None] * part, 0) / tl.sum(weight, 0)
    tl.store(Out + seq * stride_ob + head * stride_oh + offs_d, out.to(Out.dtype.element_ty))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def prefill_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                             max_seqlen: int, scale: float) -> torch.Tensor:
    """Launches the prefill kernel on inputs ``kernels.attention.prefill_attention`` has checked."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cu_seqlens = cu_seqlens.contiguous()
    T, Hq, D = q.shape
    out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    num_seqs = cu_seqlens.shape[0] - 1
    if T == 0 or num_seqs == 0 or max_seqlen == 0:
        return out

    def grid(meta: dict) -> tuple[int, int, int]:
        return triton.cdiv(max_seqlen, meta["BLOCK_M"]), Hq, num_seqs

    _prefill_kernel[grid](
        q, k, v, out, cu_seqlens, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        GROUP=Hq // k.shape[1], HEAD_DIM=D, PRECISION=_precision(q.dtype))
    return out


def dense_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Launches the dense kernel on inputs ``kernels.attention.dense_attention`` has checked; returns
    a (B, H, Lq, D) view of a contiguous (B, Lq, H, D) tensor."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, H, Lq, D)
    if B * H * Lq == 0:
        return out

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(Lq, meta["BLOCK_M"]), B * H

    _dense_kernel[grid](
        q, k, v, out, Lq, Lk, H, scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=D, PRECISION=_precision(q.dtype))
    return out


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_splits(batch: int, kv_heads: int, max_tokens: int, device: torch.device) -> int:
    """Splits of the context per (sequence, kv head): enough programs to give every SM two, but no
    split shorter than ``_DECODE_MIN_SPLIT_TOKENS`` of the longest possible context."""
    if device.type != "cuda":
        return 1
    wanted = triton.cdiv(2 * _sm_count(device.index or 0), batch * kv_heads)
    return max(1, min(wanted, triton.cdiv(max_tokens, _DECODE_MIN_SPLIT_TOKENS)))


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                            num_splits: int | None = None) -> torch.Tensor:
    """Launches the split and merge decode kernels on inputs ``decode_attention`` has checked.

    ``num_splits`` defaults to ``decode_splits`` of the block table's capacity, which needs no
    device-to-host copy of ``context_lens``.
    """
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    block_tables, context_lens = block_tables.contiguous(), context_lens.contiguous()
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    max_tokens = block_tables.shape[1] * block_size
    splits = num_splits or decode_splits(B, Hkv, max_tokens, q.device)
    split_tokens = triton.cdiv(triton.cdiv(max_tokens, splits), _DECODE_BLOCK_N) * _DECODE_BLOCK_N
    partial = torch.empty((B, Hq, splits, D), dtype=torch.float32, device=q.device)
    lse = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
    group = Hq // Hkv
    _decode_split_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, partial, lse, scale * _LOG2E, block_size, split_tokens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, BLOCK_N=_DECODE_BLOCK_N,
        PRECISION=_precision(q.dtype), num_warps=4, num_stages=2)
    _decode_merge_kernel[(B, Hq)](
        partial, lse, out, splits, partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0),
        lse.stride(1), out.stride(0), out.stride(1), HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(splits))
    return out
