"""What the Triton matmul kernels share: whether they run in the interpreter, their autotune space and
their launch geometry.

Imported only by the ``_triton_*`` kernel modules, so only where Triton runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton

# Read when the first kernel module is imported: tests set it before that, on CPU-only machines.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Weight-only matmuls (int8, int4): BLOCK_M follows the rows at launch; the autotuner picks these.
# For int4, BLOCK_K counts weights, two per loaded byte, and tl.dot needs BLOCK_K // 2 >= 16.
MATMUL_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
    for bn, bk, warps, stages in (
        (32, 128, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3),
        (128, 64, 4, 4), (128, 128, 8, 3), (128, 256, 8, 3), (256, 64, 8, 3),
    )
] if not INTERPRET else [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=1, num_stages=1)]


def matmul_launch(x: torch.Tensor, n: int) -> tuple[torch.Tensor, int, Callable[[dict], tuple[int, int]], str]:
    """What a weight-only matmul launch of ``x`` (M, K) against N output channels needs: the (M, N)
    output in x's dtype, BLOCK_M for M rows (decode steps have few, prefill many), the grid over
    (N tiles, M tiles), and tl.dot's input precision (exact for fp32, tensor cores otherwise)."""
    m = x.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m = min(128, max(16, triton.next_power_of_2(m)))

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m)

    return y, block_m, grid, "ieee" if x.dtype == torch.float32 else "tf32"
