"""Int4 weight-only linear layers: asymmetric group-wise quantization, activations untouched.

GPTQ (Frantar et al., 2022, arXiv:2210.17323) and AWQ (Lin et al., 2023, arXiv:2306.00978) serve
language models with 4-bit weights quantized in groups of consecutive input channels, each group
with its own scale and integer zero-point; gpt-fast and torchao's ``int4_weight_only`` do the same
with groups of 32 to 256. Decoding streams every weight once per step, so it reads an eighth of
the fp32 bytes (plus a scale and a zero-point per group). For a (N, K) weight and group size G::

    qweight  uint8   (N, K // 2)   byte j of row n: weight k = 2j in its low nibble, k = 2j + 1 in its high one
    scales   float32 (N, K // G)   scales[n, g] = (max(w_g, 0) - min(w_g, 0)) / 15
    zeros    uint8   (N, K // G)   zeros[n, g] = round(-min(w_g, 0) / scales[n, g]), in 0..15
    weight[n, k] ~ (q[n, k] - zeros[n, g]) * scales[n, g]   with g = k // G and q in 0..15

Asymmetric rather than symmetric because 4 bits leave only 16 levels: a symmetric grid around 0
gives up one of them and wastes up to half the range on a group whose weights lean to one sign,
while ``min..max`` uses all 16 on every group for one byte of zero-point per group (0.125 bits per
weight at G = 64). The range always includes 0 so a zero weight stays exactly zero, and an integer
zero-point keeps ``q - zero`` an exact small integer in every float dtype.

``int4_linear`` runs the Triton kernel of ``kernels._triton_int4`` for CUDA tensors when Triton
imports, elsewhere a PyTorch route; ``Int4Linear`` adds one more for few-row bfloat16 inputs on
CPU. Median ms on a 2-core AVX-512 CPU with AVX512-BF16, torch 2.13, G = 64, x (M, K) against an
(N, K) weight, the lower of two runs on a shared machine; "dense" is ``F.linear`` on the float
weight the int4 one replaces, "pack" is ``torch._weight_int4pack_mm_for_cpu``, "chunked"
dequantizes 4 MB (float32) of weight rows at a time, "full" dequantizes the whole weight with
``dequantize_int4``, ``*`` marks the route taken::

    x dtype   M x K x N          dense     pack    chunked     full
    float32   32 x 256 x 688     0.085    4.839     0.224*    0.832
    bfloat16  32 x 256 x 688     0.051    0.070*    0.224     0.300
    float32    1 x 2048 x 8192   3.634   15.349     4.238*   75.375
    float32    8 x 2048 x 8192   8.774  118.193     6.824*   79.009
    float32   32 x 2048 x 8192  13.725  460.870    10.611*   84.910
    bfloat16   1 x 2048 x 8192   1.630    0.433*    6.672    83.048
    bfloat16   8 x 2048 x 8192   1.943    1.594*    8.997    75.691
    bfloat16  16 x 2048 x 8192   3.939    3.163*    9.286    75.505
    bfloat16  32 x 2048 x 8192   3.908    6.491*    9.097    96.158
    bfloat16  64 x 2048 x 8192   6.084   12.586    11.603*   80.723
    bfloat16 128 x 2048 x 8192  10.793   24.871    16.136*   78.454
    float16    1 x 2048 x 8192   0.778   15.707     3.854*   72.926
    float16   32 x 2048 x 8192  23.783  579.114    10.886*   90.511

- ``torch._weight_int4pack_mm_for_cpu`` computes ``x @ ((q - 8) * scale + offset).T`` in one
  kernel, fast only for bfloat16, where it wins up to 32 rows (4x the dense bfloat16 matmul for
  one row). It takes groups of 32, 64, 128 or 256, N a multiple of 16, and the weight in a layout
  of its own that depends on the CPU's vector width, so that cannot be what we store:
  ``Int4Linear`` converts its buffers the first time the route applies and keeps the copy beside
  them (the int4 weight twice, still half of bfloat16's bytes).
- Otherwise a cache-sized slice of rows is unpacked and dequantized in float32 at a time and
  multiplied, so the int4 weight is the only large thing read from memory: at 2048 x 8192 about as
  fast as the dense float32 matmul for one row and faster from a few rows on, at an eighth of its
  bytes; at 256 x 688 the fixed cost of the unpacking ops makes it 2.6x slower than dense.
  float32 and float16 multiply in float32, bfloat16 converts each slice to bfloat16 and uses its
  matmul, about twice as fast as float32's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from genserve.kernels._backend import use_triton
from genserve.kernels._modules import replace_linears

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# torch._weight_int4pack_mm_for_cpu: bfloat16 inputs with at most this many rows, these group sizes,
# N a multiple of _PACK_N_MULTIPLE.
_PACK_MAX_ROWS = 32
_PACK_GROUP_SIZES = (32, 64, 128, 256)
_PACK_N_MULTIPLE = 16
# Rows of the weight dequantized at once: a float32 buffer of about this many bytes.
_DEQUANT_CHUNK_BYTES = 4 << 20


def _check_group_size(group_size: int, in_features: int = 0) -> None:
    """Raises unless ``group_size`` is a positive even int dividing ``in_features`` (0 checks the first part only)."""
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be a positive even int, got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"in_features must be a multiple of group_size {group_size}, got {in_features}")


def quantize_int4(weight: torch.Tensor, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise quantization of a (N, K) weight, in the format of the module docstring.

    Returns ``qweight`` uint8 (N, K // 2), ``scales`` float32 (N, K // group_size) and ``zeros``
    uint8 (N, K // group_size), so that ``dequantize_int4`` approximates ``weight`` to half a step,
    ``scales / 2``, in each group. K must be a multiple of ``group_size``, which must be even.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor, got {tuple(weight.shape)} {weight.dtype}")
    N, K = weight.shape
    _check_group_size(group_size, K)
    w = weight.detach().float().view(N, K // group_size, group_size)  # (N, groups, G)
    low, high = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    # An all-zero group gets the smallest normal scale rather than 0, so the division stays finite.
    scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    zeros = torch.round(-low / scales).clamp(0, 15)
    q = (torch.round(w / scales[..., None]) + zeros[..., None]).clamp(0, 15).to(torch.uint8).view(N, K)
    qweight = q[:, 0::2] | (q[:, 1::2] << 4)
    return qweight, scales, zeros.to(torch.uint8)


def _unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """The 4-bit values (N, K) uint8 in 0..15 that the (N, K // 2) bytes of ``qweight`` hold."""
    return torch.stack([qweight & 15, qweight >> 4], dim=-1).view(qweight.shape[0], -1)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (N, K) that ``qweight``, ``scales`` and ``zeros`` stand for, computed in float32."""
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    q = _unpack_int4(qweight).float().view(N, K // group_size, group_size)  # (N, groups, G)
    return ((q - zeros.float()[..., None]) * scales.float()[..., None]).view(N, K).to(dtype)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize_int4(qweight, scales, zeros, group_size).T + bias`` without materializing the float weight.

    x: (..., K) float16/bfloat16/float32; qweight: uint8 (N, K // 2); scales: (N, K // group_size)
    float, any float dtype; zeros: uint8 (N, K // group_size); bias: (N,) or None. Returns (..., N)
    in x's dtype.
    """
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be one of {_FLOAT_DTYPES}, got {x.dtype}")
    K = x.shape[-1]
    _check_group_size(group_size, K)
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or 2 * qweight.shape[1] != K:
        raise ValueError(f"qweight must be uint8 (N, {K // 2}) for x {tuple(x.shape)}, got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    N = qweight.shape[0]
    groups = (N, K // group_size)
    if scales.shape != groups or not scales.is_floating_point():
        raise ValueError(f"scales must be a float {groups} tensor, got {scales.dtype} {tuple(scales.shape)}")
    if zeros.shape != groups or zeros.dtype != torch.uint8:
        raise ValueError(f"zeros must be a uint8 {groups} tensor, got {zeros.dtype} {tuple(zeros.shape)}")
    if bias is not None and (bias.shape != (N,) or not bias.is_floating_point()):
        raise ValueError(f"bias must be a float ({N},) tensor, got {bias.dtype} {tuple(bias.shape)}")
    if any(t is not None and t.device != x.device for t in (qweight, scales, zeros, bias)):
        raise ValueError(f"x, qweight, scales, zeros and bias must be on {x.device}")
    x2d = x.reshape(-1, K)  # (M, K)
    if use_triton(x):
        from genserve.kernels._triton_int4 import int4_linear_triton

        y = int4_linear_triton(x2d, qweight, scales, zeros, group_size, bias)
    else:
        y = _chunked_dequant_mm(x2d, qweight, scales, zeros, group_size)
        if bias is not None:
            y.add_(bias)
    return y.view(*x.shape[:-1], N)  # (..., N)


def _chunked_dequant_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group_size: int) -> torch.Tensor:
    """x (M, K) @ dequantize_int4(...).T, unpacking one cache-sized slice of weight rows at a time.

    A slice is unpacked as its even-k nibbles, then its odd-k ones: two contiguous writes where
    interleaving them costs ten times as much, paid for by reordering x's columns once. When the
    matmul runs in float32 the zero-points leave the loop, since sum_k z*s*x[k] = (x's per-group
    sums) @ (z*s).T; when it runs in bfloat16 that difference of two rounded products would lose
    the result's low bits, so each slice subtracts them before it is converted.
    """
    M, K = x.shape
    N = qweight.shape[0]
    groups = K // group_size
    mm_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    fold_zeros = mm_dtype == torch.float32
    x_mm = x.to(mm_dtype)
    x_split = torch.cat([x_mm[:, 0::2], x_mm[:, 1::2]], dim=1)  # (M, K): even columns, then odd ones
    s, z = scales.float(), zeros.float()
    rows = max(1, min(N, _DEQUANT_CHUNK_BYTES // (K * 4)))
    nibbles = torch.empty(rows, K, dtype=torch.uint8, device=x.device)
    buf = torch.empty(rows, K, dtype=torch.float32, device=x.device)
    buf_mm = buf if mm_dtype == torch.float32 else torch.empty(rows, K, dtype=mm_dtype, device=x.device)
    out_t = torch.empty(N, M, dtype=mm_dtype, device=x.device)  # (N, M): each slice's product is contiguous rows
    for n0 in range(0, N, rows):
        n1 = min(n0 + rows, N)
        packed, q, w, w_mm = qweight[n0:n1], nibbles[: n1 - n0], buf[: n1 - n0], buf_mm[: n1 - n0]
        torch.bitwise_and(packed, 15, out=q[:, : K // 2])
        torch.bitwise_right_shift(packed, 4, out=q[:, K // 2:])
        w.copy_(q)
        w_groups = w.view(n1 - n0, 2, groups, group_size // 2)  # (rows, even/odd k, group, G/2)
        if not fold_zeros:
            w_groups.sub_(z[n0:n1, None, :, None])
        w_groups.mul_(s[n0:n1, None, :, None])
        if w_mm is not w:
            w_mm.copy_(w)
        torch.mm(w_mm, x_split.T, out=out_t[n0:n1])
    if fold_zeros:
        x_sums = x_mm.view(M, groups, group_size).sum(dim=-1)  # (M, groups)
        out_t.addmm_(z * s, x_sums.T, alpha=-1)
    return out_t.T.to(x.dtype).contiguous()  # (M, N)


def reference_int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The dequantized weight applied in fp32, for tests: what every ``int4_linear`` route approximates."""
    weight = dequantize_int4(qweight, scales, zeros, group_size)
    return F.linear(x.float(), weight, None if bias is None else bias.float()).to(x.dtype)


def _pack_mm_applies(x: torch.Tensor, qweight: torch.Tensor, group_size: int) -> bool:
    return (x.device.type == "cpu" and qweight.device.type == "cpu" and x.dtype == torch.bfloat16
            and x.shape[-1] == 2 * qweight.shape[1] and math.prod(x.shape[:-1]) <= _PACK_MAX_ROWS
            and group_size in _PACK_GROUP_SIZES and qweight.shape[0] % _PACK_N_MULTIPLE == 0)


def _to_pack_layout(qweight: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and (K // G, N, 2) scales-and-offsets ``torch._weight_int4pack_mm_for_cpu`` takes.

    Its kernel computes ``(q - 8) * scale + offset``, so our ``(q - zero) * scale`` is
    ``offset = (8 - zero) * scale``.
    """
    weight = torch._convert_weight_to_int4pack_for_cpu(_unpack_int4(qweight).int(), 1)  # 1: inner k-tiles, unused
    scales = scales.float()
    offsets = (8 - zeros.float()) * scales
    scales_and_offsets = torch.stack([scales, offsets], dim=-1).transpose(0, 1)  # (K // G, N, 2)
    return weight, scales_and_offsets.to(torch.bfloat16).contiguous()


class Int4Linear(nn.Module):
    """Drop-in for a bias-optional ``nn.Linear`` holding ``qweight``, ``scales`` and ``zeros`` buffers.

    Few-row bfloat16 inputs on CPU take ``torch._weight_int4pack_mm_for_cpu`` on a copy of the
    weight in its layout, built on the first such input and rebuilt when a buffer is replaced or a
    state dict loaded; it is not part of the state. Everything else goes through ``int4_linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 64,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        _check_group_size(group_size, in_features)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        self._cpu_pack: tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64) -> Int4Linear:
        """Quantizes ``linear``'s weight; its bias is kept as it is."""
        qweight, scales, zeros = quantize_int4(linear.weight, group_size)
        module = cls(linear.in_features, linear.out_features, bias=False, group_size=group_size,
                     device=linear.weight.device)
        module.qweight, module.scales, module.zeros = qweight, scales, zeros
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _pack_mm_applies(x, self.qweight, self.group_size):
            return self._pack_mm(x)
        return int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def _pack_mm(self, x: torch.Tensor) -> torch.Tensor:
        sources = (self.qweight, self.scales, self.zeros)
        if self._cpu_pack is None or any(a is not b for a, b in zip(self._cpu_pack[0], sources, strict=True)):
            self._cpu_pack = (sources, *_to_pack_layout(*sources))
        _, weight, scales_and_offsets = self._cpu_pack
        x2d = x.reshape(-1, self.in_features).contiguous()  # (M, K)
        y = torch._weight_int4pack_mm_for_cpu(x2d, weight, self.group_size, scales_and_offsets)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features)  # (..., N)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._cpu_pack = None  # loading copies into the same buffers, which the check above would not notice
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")


def quantize_linears_int4(model: nn.Module, skip: Callable[[str, nn.Linear], bool] | None = None,
                          group_size: int = 64) -> int:
    """Replaces every ``nn.Linear`` in ``model`` by an ``Int4Linear`` in place; returns how many.

    ``skip(name, linear)`` returning True keeps a layer in float. A layer whose weight is tied to
    another parameter (an ``lm_head`` sharing the embedding matrix) is always kept: quantizing it
    would keep the float matrix alive for the other user and save nothing. So is a layer whose
    ``in_features`` is not a multiple of ``group_size``: it is neither replaced nor counted.
    """
    _check_group_size(group_size)
    return replace_linears(model, lambda linear: Int4Linear.from_linear(linear, group_size),
                           lambda name, m: m.in_features % group_size != 0 or bool(skip and skip(name, m)))
