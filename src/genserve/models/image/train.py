"""``genserve train gan|vae|flow|digits-classifier``: what the digit models' trainers share.

Each trains on the digits train split for a wall-clock budget, saves ``config.json`` +
``model.safetensors`` + ``training_report.json`` to its directory, and (generators) runs
``genserve eval images`` on the result, which writes ``eval/`` and the model card. The classifier must
be trained first: the generators' evaluation uses it. Each module's ``train`` (``gan.train``, ...) is
the entry point of the family table; it passes its config and ``fit`` here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genserve.models.common.reports import machine, write_report
from genserve.models.common.weights import save_net
from genserve.models.image.digits import Split, splits
from genserve.models.registry import TRAIN_TARGETS

log = logging.getLogger(__name__)

Fit = Callable[[Split, Split, Any], tuple[nn.Module, dict]]


def train_digits_model(target: str, out: Path, cfg: Any, fit: Fit, threads: int = 1) -> dict:
    """``fit(train, held, cfg)`` with ``threads`` torch threads, the net saved to ``out`` with its
    training report; the report. ``cfg`` has ``minutes`` and ``seed``."""
    model = TRAIN_TARGETS[target].weights
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.time()
        train, held = splits()
        net, report = fit(train, held, cfg)
        save_net(net, model, out)
        command = f"genserve train {target} --minutes {cfg.minutes:g} --threads {threads} --seed {cfg.seed}"
        report = {"model": model, "command": command, **report, "minutes_total": round((time.time() - t0) / 60, 2),
                  "parameters": sum(p.numel() for p in net.parameters()),
                  "file_bytes": (out / "model.safetensors").stat().st_size, "train_images": len(train),
                  "machine": machine(threads), "config": asdict(cfg)}
        write_report(out, report)
        return report
    finally:
        torch.set_num_threads(previous)


def train_generator(target: str, out: Path, cfg: Any, fit: Fit, threads: int = 1, evaluate: bool = True) -> dict:
    """:func:`train_digits_model`, then ``genserve eval images`` on the result (which needs ``out`` to
    be named as the shipped model and the classifier beside it)."""
    report = train_digits_model(target, out, cfg, fit, threads)
    model = TRAIN_TARGETS[target].weights
    if evaluate and out.name != model:
        log.warning("not evaluated: genserve eval images expects the directory to be named %s", model)
    elif evaluate:
        from genserve.models.image.evaluate import eval_images, format_table

        log.info("\n%s", format_table(eval_images(model, root=out.parent)))
    return report


def train_classifier(out: Path, minutes: float, seed: int = 0, threads: int = 1, max_steps: int | None = None) -> dict:
    """``genserve train digits-classifier``: trains, saves to ``out`` with its card; the report."""
    from genserve.models.image.classifier import ClassifierTrainConfig, card, fit

    cfg = ClassifierTrainConfig(minutes=minutes, seed=seed, max_steps=max_steps)
    report = train_digits_model("digits-classifier", out, cfg, fit, threads)
    (out / "README.md").write_text(card(report))
    return report
