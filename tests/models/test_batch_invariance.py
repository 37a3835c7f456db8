"""``make_batch_invariant``: after it, a row's output is bit-identical alone and in any batch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
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


@pytest.fixture
def probe_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GENSERVE_CACHE_DIR", str(tmp_path))
    return tmp_path / "batch-invariance"


def probed(net: SmallNet, x: torch.Tensor, t: torch.Tensor) -> tuple[list[str], bool, int, torch.Tensor]:
    """``make_batch_invariant`` on ``net``; also how many times it ran the model, and the rows it
    then gives for a batch of all of ``x``."""
    calls = 0

    def probe(n: int) -> torch.Tensor:
        nonlocal calls
        calls += 1
        rows = probe_rows(n)
        return net(x[rows], t[rows])

    wrapped, invariant = make_batch_invariant(net, probe, x.shape[0])
    patched = [name for name, m in net.named_modules() if "forward" in vars(m)]  # what run_rows_alone did
    assert sorted(patched) == sorted(wrapped)
    with torch.no_grad():
        return wrapped, invariant, calls, net(x, t)


def test_a_second_probe_of_the_same_weights_is_read_from_the_cache(probe_cache: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="genserve.models.batch_invariance")
    first = probed(*make(12))
    assert first[2] > 10 and len(list(probe_cache.glob("*.json"))) == 1
    second = probed(*make(12))  # a fresh copy of the same weights, as at the next start
    assert second[2] == 1  # one row, for the key
    assert second[:2] == first[:2]  # the same layers wrapped, the same verdict
    assert torch.equal(second[3], first[3])
    assert [w for r in caplog.records for w in ("miss", "hit") if f"cache {w}" in r.message] == ["miss", "hit"]


def test_other_weights_or_another_batch_limit_are_probed_afresh(probe_cache: Path) -> None:
    probed(*make(12))
    net, x, t = make(12)
    with torch.no_grad():
        net.out.bias.add_(1e-3)
    assert probed(net, x, t)[2] > 10
    assert probed(*make(8))[2] > 10  # another max_rows (and other probe inputs)
    assert len(list(probe_cache.glob("*.json"))) == 3


@pytest.mark.parametrize("content", ["{not json", '{"key": 1}', '["wrapped"]', ""])
def test_a_corrupt_cache_file_is_ignored_and_rewritten(probe_cache: Path, content: str) -> None:
    first = probed(*make(12))
    (path,) = probe_cache.glob("*.json")
    path.write_text(content)
    again = probed(*make(12))
    assert again[2] > 10 and again[:2] == first[:2] and torch.equal(again[3], first[3])
    assert json.loads(path.read_text())["wrapped"] == first[0]
    assert probed(*make(12))[2] == 1


def test_a_cached_layer_the_model_lacks_is_not_trusted(probe_cache: Path) -> None:
    first = probed(*make(12))
    (path,) = probe_cache.glob("*.json")
    entry = json.loads(path.read_text())
    path.write_text(json.dumps({**entry, "wrapped": [*entry["wrapped"], "no.such.layer"]}))
    again = probed(*make(12))
    assert again[2] > 10 and again[:2] == first[:2]


def test_a_cache_that_cannot_be_written_only_costs_a_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("GENSERVE_CACHE_DIR", str(tmp_path / "file"))  # a directory cannot be made under a file
    first, again = probed(*make(12)), probed(*make(12))
    assert again[2] > 10 and again[:2] == first[:2] and torch.equal(again[3], first[3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no temporary file left behind
