"""What the Triton matmul kernels share: whether they run in the interpreter, and their autotune space.

Imported only by the ``_triton_*`` kernel modules, so only where Triton runs.
"""

from __future__ import annotations

import os

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
