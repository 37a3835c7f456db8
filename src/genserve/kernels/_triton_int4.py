"""Triton kernel behind ``kernels.int4.int4_linear``: a tiled matmul whose weight tiles are packed int4.

Each program computes one (BLOCK_M, BLOCK_N) tile of ``x @ W.T`` as in Triton's
``03-matrix-multiplication`` tutorial, except that W arrives as bytes holding two 4-bit weights
each, an eighth of fp32's bytes. A byte's low nibble is the weight of an even k, its high nibble the
next odd k (the layout ``kernels.int4`` documents), so instead of interleaving the two nibbles back
into one (BLOCK_K, BLOCK_N) tile the kernel multiplies them by x's even and odd columns in two dots.
Both weights of a byte share a group (the group size is even), so one gather of the per-group
scales and zero-points serves both: ``w = (q - zero) * scale`` is formed in fp32 registers,
rounded to x's dtype and accumulated in fp32, as GPTQ's Triton kernels do (Frantar et al., 2022,
arXiv:2210.17323).

BLOCK_M follows the number of rows (decode steps have few, prefill many) and the autotuner picks
the rest per (N, K, BLOCK_M), caching its choice on disk for the next process. With
``TRITON_INTERPRET=1`` set before this module is imported the kernel runs on CPU tensors in
Triton's interpreter with one small configuration.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from genserve.kernels._triton_common import INTERPRET, MATMUL_CONFIGS, matmul_launch

_INTERPRET = INTERPRET  # the tests check it


@triton.autotune(configs=MATMUL_CONFIGS, key=["N", "K", "BLOCK_M"], cache_results=True)
@triton.jit
def _int4_matmul_kernel(X, W, Scales, Zeros, Bias, Y, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                        stride_sn, stride_sg, stride_zn, stride_zg, stride_ym, stride_yn,
                        GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M * N may pass 2**31 (lm_head on a long prompt)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_K // 2)  # bytes of the tile: weights k0 + 2 * b (low nibble) and k0 + 2 * b + 1
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = X + offs_m[:, None] * stride_xm + (2 * offs_b)[None, :] * stride_xk  # (BLOCK_M, BLOCK_K // 2), even k
    w_ptrs = W + offs_b[:, None] * stride_wk + offs_n[None, :] * stride_wn  # (BLOCK_K // 2, BLOCK_N) bytes of W.T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        b_ok = offs_b < (K - k0) // 2
        x_mask = m_ok[:, None] & b_ok[None, :]
        x_even = tl.load(x_ptrs, mask=x_mask, other=0.0)
        x_odd = tl.load(x_ptrs + stride_xk, mask=x_mask, other=0.0)
        w_mask = b_ok[:, None] & n_ok[None, :]
        packed = tl.load(w_ptrs, mask=w_mask, other=0)
        group = ((k0 + 2 * offs_b) // GROUP_SIZE)[:, None]  # (BLOCK_K // 2, 1)
        scale = tl.load(Scales + offs_n[None, :] * stride_sn + group * stride_sg, mask=w_mask, other=0.0)
        zero = tl.load(Zeros + offs_n[None, :] * stride_zn + group * stride_zg, mask=w_mask, other=0)
        scale = scale.to(tl.float32)
        zero = zero.to(tl.float32)
        w_even = ((packed & 0xF).to(tl.float32) - zero) * scale
        w_odd = ((packed >> 4).to(tl.float32) - zero) * scale
        acc = tl.dot(x_even, w_even.to(x_even.dtype), acc, input_precision=PRECISION)
        acc = tl.dot(x_odd, w_odd.to(x_odd.dtype), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += (BLOCK_K // 2) * stride_wk
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def int4_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) -> (M, N) on inputs ``kernels.int4.int4_linear`` has checked."""
    M, K = x.shape
    N = qweight.shape[0]
    y, block_m, grid, precision = matmul_launch(x, N)
    if M == 0:
        return y
    bias = None if bias is None else bias.contiguous()
    _int4_matmul_kernel[grid](
        x, qweight, scales, zeros, bias, y, M, N, K, x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1),
        scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1), y.stride(0), y.stride(1),
        GROUP_SIZE=group_size, HAS_BIAS=bias is not None,
        PRECISION=precision, BLOCK_M=block_m)
    return y
