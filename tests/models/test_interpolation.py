"""The one slerp and lerp of every family (``models/common/interpolation.py``)."""

from __future__ import annotations

import torch

from genserve.models.common.interpolation import lerp, slerp


def test_slerp_walks_directions_and_norms_and_ends_exactly() -> None:
    a, b = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    b = 3 * b
    t = torch.linspace(0, 1, 5)
    path = slerp(a, b, t)
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)  # the ends are the inputs, bit for bit
    assert torch.allclose(path.norm(dim=1), torch.lerp(a.norm(), b.norm(), t), atol=1e-5)
    unit = path / path.norm(dim=1, keepdim=True)
    cosines = (unit[:-1] * unit[1:]).sum(1)  # equal steps along the great circle: equal angles
    assert torch.allclose(cosines, cosines[0].expand_as(cosines), atol=1e-5)


def test_parallel_and_antiparallel_fall_back_to_lerp() -> None:
    a = torch.tensor([1.0, 2.0, 2.0])
    for b in (2 * a, -a):
        assert torch.allclose(slerp(a, b, 0.5), lerp(a, b, 0.5))
        assert torch.allclose(slerp(a, b, 0.5, norms=False), lerp(a, b, 0.5))
    assert torch.equal(lerp(a, -a, torch.tensor([0.0, 1.0])), torch.stack([a, -a]))
