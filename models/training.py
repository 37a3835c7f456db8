"""What every trainer of an embedded model shares: AdamW with decay on matrices only, warm-up then
cosine decay over a wall-clock budget, keeping the best checkpoint in memory, and the loop of the
evaluation classifiers (digits, emoji)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class Schedule(Protocol):
    lr: float
    warmup_steps: int
    min_lr_ratio: float


class ClassifierSchedule(Schedule, Protocol):
    minutes: float
    max_steps: int | None
    batch_size: int
    weight_decay: float
    seed: int
    eval_every: int


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


def fit_classifier(net: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor], evaluate: Callable[[], float],
                   metric: str, cfg: ClassifierSchedule) -> tuple[int, float, list[dict]]:
    """Cross-entropy of ``net`` on ``augment``-ed random batches of ``x`` (labels ``y``) for
    ``cfg.minutes`` of wall clock (or ``cfg.max_steps``), the batches and augmentation drawn from a
    generator seeded ``cfg.seed``. ``evaluate()`` is recorded as ``metric`` every ``cfg.eval_every``
    steps and at the end. Returns (steps, seconds, curve); ``net`` is left in eval mode."""
    g = torch.Generator().manual_seed(cfg.seed)
    opt = adamw(net, cfg.lr, cfg.weight_decay)
    curve, step, start = [], 0, time.time()
    while True:
        progress = (time.time() - start) / (cfg.minutes * 60)
        set_lr(opt, lr_at(cfg, step, progress))
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=g)
        net.train()
        loss = F.cross_entropy(net(augment(x[idx], g)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        last = step == cfg.max_steps or progress >= 1
        if step % cfg.eval_every == 0 or last:
            value = evaluate()
            curve.append({"step": step, "seconds": round(time.time() - start, 1), "train_loss": loss.item(),
                          metric: value})
            log.info("step %d  loss %.4f  %s %.4f", step, loss.item(), metric.replace("_", " "), value)
        if last:
            return step, time.time() - start, curve
