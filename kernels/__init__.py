"""Kernels for the serving hot path: attention and int8 weight-only matmul.

Each module pairs Triton kernels (CUDA, imported only when a CUDA tensor arrives) with a PyTorch
path that serves everywhere else, and a slow reference the tests compare both against.
"""

from kernels.attention import decode_attention, prefill_attention, reference_attention
from kernels.int8 import Int8Linear, int8_linear, quantize_int8, quantize_linears_int8

__all__ = [
    "Int8Linear",
    "decode_attention",
    "int8_linear",
    "prefill_attention",
    "quantize_int8",
    "quantize_linears_int8",
    "reference_attention",
]
