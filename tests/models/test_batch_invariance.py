"""``make_batch_invariant``: after it, a row's output is bit-identical alone and in any batch."""

from __future__ import annotations

import torch
from torch import nn

from genserve.models.batch_invariance import make_batch_invariant, probe_rows, probe_sizes, run_rows_alone


class SmallNet(nn.Module):
    """Layers of the kinds that vary with batch size on oneDNN/MKL: a convolution over a small map
    with many channels, and a linear layer over one vector per row."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 128, 3, padding=1)
        self.conv = nn.Conv2d(128, 128, 3, padding=1)
        self.norm = nn.GroupNorm(32, 128)
        self.embed = nn.Linear(16, 128)
        self.out = nn.Conv2d(128, 3, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x) + self.embed(t)[:, :, None, None]  # (B, 128, 8, 8)
        return self.out(torch.relu(self.norm(self.conv(h))))


def make(rows: int) -> tuple[SmallNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return SmallNet().eval(), torch.randn(rows, 3, 8, 8, generator=g), torch.randn(rows, 16, generator=g)


def test_rows_are_identical_alone_and_in_every_batch_size_after_probing():
    net, x, t = make(12)

    def probe(n: int) -> torch.Tensor:
        rows = probe_rows(n)
        return net(x[rows], t[rows])

    wrapped, invariant = make_batch_invariant(net, probe, 12)
    assert invariant
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        x2, t2 = torch.randn(12, 3, 8, 8, generator=g), torch.randn(12, 16, generator=g)  # not the probe's inputs
        alone = [net(x2[k:k + 1], t2[k:k + 1])[0] for k in range(12)]
        for n in range(2, 13):  # every size, not only the probed ones
            out = net(x2[:n], t2[:n])
            assert all(torch.equal(out[k], alone[k]) for k in range(n)), (n, wrapped)


def test_running_rows_alone_computes_what_a_batch_of_one_does():
    layer = nn.Linear(16, 8)
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = torch.cat([layer(x[i:i + 1]) for i in range(5)])
        run_rows_alone(layer)
        assert torch.equal(layer(x), expected)
        assert torch.equal(layer(x[:1]), expected[:1])


def test_probe_sizes_cover_the_small_batches_and_the_largest():
    assert probe_sizes(16) == [2, 3, 4, 5, 7, 8, 12, 15, 16]
    assert probe_sizes(3) == [2, 3]
    assert probe_sizes(1) == []
