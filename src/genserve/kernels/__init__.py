"""Kernels for the serving hot path: attention and int8 and int4 weight-only matmul.

Each module pairs Triton kernels (CUDA, imported only when a CUDA tensor arrives) with a PyTorch
path that serves everywhere else, and a slow reference the tests compare both against.
"""

from genserve.kernels.attention import (
    decode_attention,
    dense_attention,
    prefill_attention,
    reference_attention,
    reference_dense_attention,
)
from genserve.kernels.int4 import Int4Linear, int4_linear, quantize_int4, quantize_linears_int4
from genserve.kernels.int8 import Int8Linear, int8_linear, quantize_int8, quantize_linears_int8

__all__ = [
    "Int4Linear",
    "Int8Linear",
    "decode_attention",
    "dense_attention",
    "int4_linear",
    "int8_linear",
    "prefill_attention",
    "quantize_int4",
    "quantize_int8",
    "quantize_linears_int4",
    "quantize_linears_int8",
    "reference_attention",
    "reference_dense_attention",
]
