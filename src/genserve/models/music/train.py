"""``genserve train music``: trains ``genserve-music`` on the Bach chorales that music21 ships.

Every training chorale (``data``) becomes ``BOS`` step + its steps, four tokens a step. A batch
holds random windows of ``context + 1`` tokens that start on a step (pieces drawn in proportion to
their length, short ones padded); the loss is next-token cross-entropy, padding ignored. Training
runs for a wall-clock budget (warm-up then cosine decay), the checkpoint with the lowest NLL on the
``valid`` split is kept (float16), and the report gives the NLL per token of the saved weights on the
``test`` split, each token predicted once with the context of its window.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genserve.models.common.reports import machine
from genserve.models.common.training import adamw, lr_at, set_lr, snapshot
from genserve.models.music.data import encode, load_chorales
from genserve.models.music.generator import load, save_model
from genserve.models.music.model import BOS, MODES, PAD, STEPS_PER_BAR, ChoraleConfig, ChoraleTransformer, slot_ids

log = logging.getLogger(__name__)


@dataclass
class MusicTrainConfig:
    minutes: float = 22.0
    n_layer: int = 4
    n_head: int = 6
    d_model: int = 192
    context: int = 256
    dropout: float = 0.15
    batch_size: int = 16
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.1
    eval_every: int = 100
    max_steps: int | None = None  # stop early (tests); None: the wall-clock budget only
    seed: int = 0
    threads: int = 1


@dataclass
class Sequence:
    tokens: torch.Tensor  # (4 * (steps + 1),) with the BOS step first
    slots: torch.Tensor   # (4 * (steps + 1),) the slot of each token
    mode: int


def to_sequence(tokens: np.ndarray, positions: np.ndarray, mode: str) -> Sequence:
    """(steps, 4) tokens and (steps,) bar positions -> the flat sequence the model reads."""
    flat = np.concatenate([np.full(4, BOS), tokens.reshape(-1)])
    pos = np.concatenate([[(positions[0] - 1) % STEPS_PER_BAR], positions])
    return Sequence(torch.from_numpy(flat), slot_ids(torch.from_numpy(pos)[None])[0], MODES.index(mode))


def sequences(split: str) -> list[Sequence]:
    return [to_sequence(*encode(p), p.mode) for p in load_chorales(split)]


def window(seq: Sequence, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and slots ``[start, start + length)``, padded with PAD past the end."""
    tok, slot = seq.tokens[start:start + length], seq.slots[start:start + length]
    pad = length - tok.shape[0]
    return F.pad(tok, (0, pad), value=PAD), F.pad(slot, (0, pad))


def random_batch(seqs: list[Sequence], cfg: MusicTrainConfig, rng: random.Random):
    """(B, context + 1) tokens and slots, (B,) modes: windows starting on random steps."""
    weights = [len(s.tokens) for s in seqs]
    picks = rng.choices(seqs, weights=weights, k=cfg.batch_size)
    toks, slots = [], []
    for s in picks:
        last_step = max(0, (len(s.tokens) - cfg.context - 1) // 4)
        tok, slot = window(s, 4 * rng.randint(0, last_step), cfg.context + 1)
        toks.append(tok)
        slots.append(slot)
    return torch.stack(toks), torch.stack(slots), torch.tensor([s.mode for s in picks])


def batch_loss(model: ChoraleTransformer, tokens: torch.Tensor, slots: torch.Tensor, modes: torch.Tensor,
               reduction: str = "mean") -> torch.Tensor:
    logits = model(tokens[:, :-1], slots[:, 1:], modes)  # (B, T, vocab): input i predicts token i + 1
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=PAD,
                           reduction=reduction)


@torch.no_grad()
def heldout_nll(model: ChoraleTransformer, seqs: list[Sequence], context: int) -> float:
    """Mean NLL per predicted token (BOS excluded), each token once, in consecutive windows."""
    was_training = model.training
    model.eval()
    total = count = 0.0
    for s in seqs:
        starts = range(0, len(s.tokens) - 1, context)
        tok, slot = zip(*(window(s, i, context + 1) for i in starts), strict=True)
        tokens = torch.stack(tok)
        targets = tokens[:, 1:]
        keep = (targets != PAD) & (targets != BOS)
        logits = model(tokens[:, :-1], torch.stack(slot)[:, 1:], torch.full((len(tok),), s.mode))
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        total += nll[keep.flatten()].sum().item()
        count += keep.sum().item()
    model.train(was_training)
    return total / count


def train_music(out: Path, cfg: MusicTrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    t0 = time.time()
    train, valid, test = sequences("train"), sequences("valid"), sequences("test")
    n_tokens = sum(len(s.tokens) for s in train)
    log.info("data: %d/%d/%d train/valid/test chorales, %d training tokens, read in %.0fs",
             len(train), len(valid), len(test), n_tokens, time.time() - t0)
    mcfg = ChoraleConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model, context=cfg.context,
                         dropout=cfg.dropout)
    model = ChoraleTransformer(mcfg)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters", n_params / 1e6)
    opt = adamw(model, cfg.lr, cfg.weight_decay, betas=(0.9, 0.95))
    best: tuple[float, dict | None, int] = (float("inf"), None, 0)
    step, seen, start, budget = 0, 0, time.time(), cfg.minutes * 60
    while (elapsed := time.time() - start) < budget and (cfg.max_steps is None or step < cfg.max_steps):
        set_lr(opt, lr_at(cfg, step, elapsed / budget))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # 1.4x the float32 speed on AVX512-BF16
            loss = batch_loss(model, *random_batch(train, cfg, rng))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        seen += cfg.batch_size * cfg.context
        if step % cfg.eval_every == 0:
            nll = heldout_nll(model, valid, cfg.context)
            if nll < best[0]:
                best = (nll, snapshot(model), step)
            log.info("step %d  %.0fs  %.1f epochs  train loss %.4f  valid nll %.4f  lr %.2e",
                     step, elapsed, seen / n_tokens, loss.item(), nll, opt.param_groups[0]["lr"])
    if best[1] is not None:
        model.load_state_dict(best[1])
    save_model(model, out, {"data": "music21 corpus: Bach chorales, four parts, 4/4", "grid": "eighth notes"})
    shipped = load(out, torch.device("cpu"), torch.float32).model  # what ships: float16, read back
    valid_nll, test_nll = heldout_nll(shipped, valid, cfg.context), heldout_nll(shipped, test, cfg.context)
    report = {"steps": step, "best_step": best[2], "minutes": (time.time() - t0) / 60, "parameters": n_params,
              "train_chorales": len(train), "valid_chorales": len(valid), "test_chorales": len(test),
              "train_tokens": n_tokens, "epochs": seen / n_tokens, "valid_nll_per_token": valid_nll,
              "heldout_nll_per_token": test_nll, "heldout_nll_per_step": 4 * test_nll,
              "machine": machine(cfg.threads),
              "config": asdict(cfg)}
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("saved %s: test NLL %.4f per token (perplexity %.3f)", out, test_nll, math.exp(test_nll))
    return report


def train(out: Path, minutes: float, seed: int = 0, threads: int = 2) -> dict:
    """``genserve train music``."""
    return train_music(out, MusicTrainConfig(minutes=minutes, seed=seed, threads=threads))
