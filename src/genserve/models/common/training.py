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


class LoopSchedule(Schedule, Protocol):
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


def train_loop(net: nn.Module, n: int, cfg: LoopSchedule,
               batch_loss: Callable[[torch.Tensor, torch.Generator, float], tuple[torch.Tensor, float]],
               evaluate: Callable[[float, float], tuple[float | None, dict]],
               grad_clip: float | None = None) -> tuple[int, int, float, list[dict]]:
    """AdamW on random batches of ``n`` examples for ``cfg.minutes`` of wall clock (or
    ``cfg.max_steps``), batches drawn from a generator seeded ``cfg.seed``.

    ``batch_loss(indices, generator, progress)`` gives the loss to minimise and the number to log
    for it. Every ``cfg.eval_every`` steps and at the end, ``evaluate(progress, mean logged
    number since the last evaluation)`` gives (score, curve row): the weights with the lowest score
    are kept (None: not eligible) and restored at the end. Returns (steps, best step or 0,
    seconds, curve); ``net`` is left in eval mode."""
    g = torch.Generator().manual_seed(cfg.seed)
    opt = adamw(net, cfg.lr, cfg.weight_decay)
    best_score, best_state, best_step = float("inf"), None, 0
    curve, window, step, start = [], [], 0, time.time()
    while True:
        progress = (time.time() - start) / (cfg.minutes * 60)
        set_lr(opt, lr_at(cfg, step, progress))
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
        net.train()
        loss, logged = batch_loss(idx, g, progress)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        opt.step()
        step += 1
        window.append(logged)
        last = step == cfg.max_steps or progress >= 1
        if step % cfg.eval_every == 0 or last:
            score, row = evaluate(progress, sum(window) / len(window))
            if score is not None and score < best_score:
                best_score, best_state, best_step = score, snapshot(net), step
            curve.append({"step": step, "seconds": round(time.time() - start, 1), **row})
            log.info("step %d  %.0fs  %s", step, time.time() - start,
                     "  ".join(f"{k} {v:.4g}" for k, v in row.items()))
            window = []
        if last:
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    return step, best_step, time.time() - start, curve


def fit_classifier(net: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor], evaluate: Callable[[], float],
                   metric: str, cfg: LoopSchedule) -> tuple[int, float, list[dict]]:
    """Cross-entropy of ``net`` on ``augment``-ed random batches of ``x`` (labels ``y``) through
    :func:`train_loop`; ``evaluate()`` is recorded as ``metric`` (the last weights are kept).
    Returns (steps, seconds, curve); a row's ``train_loss`` is the last batch's."""
    last_loss = [0.0]

    def batch_loss(idx: torch.Tensor, g: torch.Generator, _progress: float) -> tuple[torch.Tensor, float]:
        loss = F.cross_entropy(net(augment(x[idx], g)), y[idx])
        last_loss[0] = loss.item()
        return loss, last_loss[0]

    def record(_progress: float, _mean_loss: float) -> tuple[None, dict]:
        return None, {"train_loss": last_loss[0], metric: evaluate()}

    steps, _, seconds, curve = train_loop(net, len(x), cfg, batch_loss, record)
    return steps, seconds, curve
