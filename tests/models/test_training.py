"""The pieces every trainer shares: decay on matrices and kernels, the learning-rate schedule, snapshots."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from genserve.models.common.training import adamw, lr_at, set_lr, snapshot


def test_adamw_decays_matrices_and_kernels_and_optimises_every_parameter():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4, 3), nn.LayerNorm(3))
    opt = adamw(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and [p.dim() for p in decayed["params"]] == [4, 2]
    assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    assert decayed["betas"] == (0.9, 0.95)
    set_lr(opt, 5e-4)
    assert all(g["lr"] == 5e-4 for g in opt.param_groups)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = SimpleNamespace(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(0.1) and lr_at(cfg, 9, 0.0) == pytest.approx(1.0)
    assert lr_at(cfg, 10, 0.0) == pytest.approx(1.0)
    assert lr_at(cfg, 50, 0.5) == pytest.approx(0.55)
    assert lr_at(cfg, 99, 1.0) == pytest.approx(0.1) == lr_at(cfg, 99, 2.0)


def test_snapshot_is_a_detached_copy():
    model = nn.Linear(2, 2)
    saved = snapshot(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(saved["weight"], model.weight)
    model.load_state_dict(saved)
    assert torch.equal(saved["weight"], model.weight)
