"""Int8 weight-only linear layers: symmetric per-output-channel quantization, activations untouched.

LLM.int8() (Dettmers et al., 2022, arXiv:2208.07339) showed per-row absmax int8 weights keep a
language model's quality; storing only the weights in int8 (as gpt-fast and torchao's
``int8_weight_only`` do) makes decoding, which streams every weight once per step, read a quarter
of the fp32 bytes. ``qweight[n, k] = round(weight[n, k] / scales[n])`` with
``scales[n] = max_k |weight[n, k]| / 127``.

``int8_linear`` runs the Triton kernel of ``kernels._triton_int8`` for CUDA tensors when Triton
imports. Elsewhere it takes the fastest PyTorch route measured for the input. Median ms on a 2-core
AVX-512 CPU, torch 2.13, x (M, K) against an (N, K) weight; "dense" is ``F.linear`` on the float
weight the int8 one replaces, "pack" is ``torch._weight_int8pack_mm``, "chunked" dequantizes 4 MB of
weight rows at a time, "full" dequantizes the whole weight, ``*`` marks the route taken::

    x dtype   M x K x N          dense    pack    chunked    full
    float32   32 x 256 x 688     0.085   4.197    0.165*    0.142
    bfloat16  32 x 256 x 688     0.051   0.090    0.110*    0.098
    float32    1 x 2048 x 8192   3.860   6.969    1.919*   40.777
    float32    8 x 2048 x 8192   8.245     -      4.952*   48.819
    float32   32 x 2048 x 8192  13.698     -      7.587*   52.974
    bfloat16   1 x 2048 x 8192   1.470   0.474*   2.253    51.552
    bfloat16   8 x 2048 x 8192   1.644   1.918*   4.468    52.797
    bfloat16  16 x 2048 x 8192   2.323   4.131*   4.597    46.780
    bfloat16  32 x 2048 x 8192   3.426   7.717    4.537*   57.071
    float16    1 x 2048 x 8192   0.740   8.566    6.943*   59.000

- ``torch._weight_int8pack_mm`` computes x @ (qweight * scales).T in one kernel, vectorized on x86
  only for bfloat16, and there it wins up to about 16 rows; for float32 and float16 it is a
  scalar loop.
- Otherwise a cache-sized slice of rows is converted to x's dtype and multiplied at a time (the
  scales applied once to the product, or to each slice in float16, against overflow), so the int8
  weight is the only large thing read from memory: for float32 that beats the dense float32
  matmul, which reads four times the bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from genserve.kernels._backend import use_triton
from genserve.kernels._modules import replace_linears

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# bfloat16 inputs with at most this many rows take torch._weight_int8pack_mm on CPU.
_PACK_MAX_ROWS = 16
# Its AVX kernels load 16 values of a row per step with aligned loads.
_PACK_K_MULTIPLE = 16
_PACK_ALIGNMENT = 64
# Rows of the weight dequantized at once: a buffer of about this many bytes.
_DEQUANT_CHUNK_BYTES = 4 << 20


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization of a (N, K) weight.

    Returns ``qweight`` int8 (N, K) in -127..127 and ``scales`` float32 (N,), so that
    ``qweight * scales[:, None]`` approximates ``weight`` to half a step, ``scales / 2``, per row.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor, got {tuple(weight.shape)} {weight.dtype}")
    w = weight.detach().float()
    # An all-zero row gets the smallest normal scale rather than 0, so the division stays finite.
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    qweight = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return qweight, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (N, K) that ``qweight`` and ``scales`` stand for."""
    return (qweight.float() * scales.float()[:, None]).to(dtype)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (qweight * scales[:, None]).T + bias`` without materializing the float weight.

    x: (..., K) float16/bfloat16/float32; qweight: int8 (N, K); scales: (N,) float, any float
    dtype; bias: (N,) or None. Returns (..., N) in x's dtype.
    """
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be one of {_FLOAT_DTYPES}, got {x.dtype}")
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or x.shape[-1] != qweight.shape[1]:
        raise ValueError(f"qweight must be int8 (N, {x.shape[-1]}) for x {tuple(x.shape)}, got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    N, K = qweight.shape
    for name, t in (("scales", scales), ("bias", bias)):
        if t is not None and (t.shape != (N,) or not t.is_floating_point()):
            raise ValueError(f"{name} must be a float ({N},) tensor, got {t.dtype} {tuple(t.shape)}")
    if any(t is not None and t.device != x.device for t in (qweight, scales, bias)):
        raise ValueError(f"x, qweight, scales and bias must be on {x.device}")
    x2d = x.reshape(-1, K)  # (M, K)
    if use_triton(x):
        from genserve.kernels._triton_int8 import int8_linear_triton

        y = int8_linear_triton(x2d, qweight, scales, bias)
    else:
        y = _int8_linear_torch(x2d, qweight, scales, bias)
    return y.view(*x.shape[:-1], N)  # (..., N)


def _int8_linear_torch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) -> (M, N) by the route the module docstring's table picks."""
    if _pack_mm_applies(x, qweight):
        x = x.contiguous()
        if x.data_ptr() % _PACK_ALIGNMENT:
            x = x.clone()  # a fresh allocation is 64-byte aligned
        y = torch._weight_int8pack_mm(x, qweight, scales.to(x.dtype))
    else:
        y = _chunked_dequant_mm(x, qweight, scales)
    return y if bias is None else y.add_(bias)


def _pack_mm_applies(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.shape[0] <= _PACK_MAX_ROWS
            and x.shape[1] % _PACK_K_MULTIPLE == 0 and qweight.is_contiguous()
            and qweight.data_ptr() % _PACK_ALIGNMENT == 0)


def _chunked_dequant_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (qweight * scales[:, None]).T, converting ``qweight`` to x's dtype one cache-sized slice of rows at a time.

    The scales multiply the product once at the end, except in float16, whose 65504 ceiling an
    unscaled int8 dot product can pass: there each slice is scaled as it is converted.
    """
    M, K = x.shape
    N = qweight.shape[0]
    rows = max(1, min(N, _DEQUANT_CHUNK_BYTES // (K * x.element_size())))
    prescale = x.dtype == torch.float16
    s = scales.to(x.dtype)
    buf = torch.empty(rows, K, dtype=x.dtype, device=x.device)
    out_t = torch.empty(N, M, dtype=x.dtype, device=x.device)  # (N, M): each slice's product is contiguous rows
    for n0 in range(0, N, rows):
        w = buf[: min(rows, N - n0)]
        if prescale:
            torch.mul(qweight[n0:n0 + rows], s[n0:n0 + rows, None], out=w)
        else:
            w.copy_(qweight[n0:n0 + rows])  # int8 values are exact in every float dtype
        torch.mm(w, x.T, out=out_t[n0:n0 + rows])
    if not prescale:
        out_t.mul_(s[:, None])
    return out_t.T.contiguous()  # (M, N)


def reference_int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The dequantized weight applied in fp32, for tests: what every ``int8_linear`` route approximates."""
    y = F.linear(x.float(), dequantize_int8(qweight, scales), None if bias is None else bias.float())
    return y.to(x.dtype)


class Int8Linear(nn.Module):
    """Drop-in for a bias-optional ``nn.Linear`` holding ``qweight`` (int8) and ``scales`` (float32) buffers."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantizes ``linear``'s weight; its bias is kept as it is."""
        qweight, scales = quantize_int8(linear.weight)
        module = cls(linear.in_features, linear.out_features, bias=False, device=linear.weight.device)
        module.qweight, module.scales = qweight, scales
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.scales, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linears_int8(model: nn.Module, skip: Callable[[str, nn.Linear], bool] | None = None) -> int:
    """Replaces every ``nn.Linear`` in ``model`` by an ``Int8Linear`` in place; returns how many.

    ``skip(name, linear)`` returning True keeps a layer in float. A layer whose weight is tied to
    another parameter (an ``lm_head`` sharing the embedding matrix) is always kept: quantizing it
    would keep the float matrix alive for the other user and save nothing.
    """
    return replace_linears(model, Int8Linear.from_linear, skip)
