"""Triton kernel behind ``kernels.int8.int8_linear``: a tiled matmul whose weight tiles are int8.

Each program computes one (BLOCK_M, BLOCK_N) tile of ``x @ W.T`` as in Triton's
``03-matrix-multiplication`` tutorial, except that the (BLOCK_K, BLOCK_N) tile of W is loaded as
int8 (a quarter of fp32's bytes, half of bf16's), converted to x's dtype in registers (exact:
|q| <= 127) and the per-output-channel scales multiply the fp32 accumulator once, after the K
loop (LLM.int8(), Dettmers et al., 2022, arXiv:2208.07339, without the outlier decomposition).

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
def _int8_matmul_kernel(X, W, Scales, Bias, Y, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                        stride_ym, stride_yn, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M * N may pass 2**31 (lm_head on a long prompt)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    w_ptrs = W + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # (BLOCK_K, BLOCK_N) tile of W.T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    n_ok = offs_n < N
    acc = acc * tl.load(Scales + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=(offs_m[:, None] < M) & n_ok[None, :])


def int8_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) -> (M, N) on inputs ``kernels.int8.int8_linear`` has checked."""
    M, K = x.shape
    N = qweight.shape[0]
    y, block_m, grid, precision = matmul_launch(x, N)
    if M == 0:
        return y
    scales = scales.contiguous()
    bias = None if bias is None else bias.contiguous()
    _int8_matmul_kernel[grid](
        x, qweight, scales, bias, y, M, N, K, x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1),
        y.stride(0), y.stride(1), HAS_BIAS=bias is not None,
        PRECISION=precision, BLOCK_M=block_m)
    return y
