"""What every trainer of an embedded model shares: AdamW with decay on matrices only, warm-up then
cosine decay over a wall-clock budget, and keeping the best checkpoint in memory."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn


class Schedule(Protocol):
    lr: float
    warmup_steps: int
    min_lr_ratio: float


def adamw(model: nn.Module, lr: float, weight_decay: float,
          betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW that decays weight matrices and convolution kernels (every parameter of two or more
    dimensions) and leaves norms, biases and other vectors alone; every parameter is optimised."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)


def lr_at(cfg: Schedule, step: int, progress: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``progress`` 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the weights, to restore the best checkpoint after training."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
