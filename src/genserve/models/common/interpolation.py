"""Walks between two latent vectors: the straight line (lerp) and the great circle (slerp).

One ``slerp`` for every family (images, molecules). Gaussian latents concentrate on a shell, and
the straight line between two of them passes through its inside, where a decoder has seen few
latents; the great circle stays on it (White 2016, "Sampling generative networks").
"""

from __future__ import annotations

import torch


def _weights(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(t, dtype=like.dtype, device=like.device).reshape(-1, 1)  # (S, 1)


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Points (1 - t)·a + t·b for vectors a, b (Z,) and t scalar or (S,) → (S, Z)."""
    return torch.lerp(a[None], b[None], _weights(t, a))


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | float, norms: bool = True) -> torch.Tensor:
    """Spherical interpolation from a (t = 0) to b (t = 1) for vectors a, b (Z,) and t scalar or (S,) → (S, Z).

    ``norms=True``: the direction walks the great circle between a's and b's and the norm goes
    linearly from |a| to |b|, ending exactly on a and b. ``norms=False``: White's formula on the raw
    vectors, (sin((1 - t)Ω)·a + sin(tΩ)·b) / sin Ω. Where a and b are (anti)parallel the great circle
    is degenerate or undefined and both fall back to :func:`lerp`.
    """
    w = _weights(t, a)
    na, nb = a.norm(), b.norm()
    omega = torch.arccos(torch.clamp(torch.dot(a / na, b / nb), -1.0, 1.0))
    if torch.sin(omega).abs() < 1e-6:
        return lerp(a, b, t)
    if not norms:
        return (torch.sin((1 - w) * omega) * a + torch.sin(w * omega) * b) / torch.sin(omega)
    direction = (torch.sin((1 - w) * omega) * (a / na) + torch.sin(w * omega) * (b / nb)) / torch.sin(omega)
    path = direction * torch.lerp(na, nb, w)
    ends = w[:, 0]
    path[ends == 0], path[ends == 1] = a, b  # the ends exactly: the inputs' own decodes
    return path
