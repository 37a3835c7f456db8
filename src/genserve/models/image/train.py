"""``genserve train gan|vae|flow|digits-classifier``: one entry for the digit models.

Each trains on the digits train split for a wall-clock budget, saves ``config.json`` +
``model.safetensors`` + ``training_report.json`` to its directory, and (generators) runs
``genserve eval images`` on the result, which writes ``eval/`` and the model card. The classifier must
be trained first: the generators' evaluation uses it.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from genserve.models.image import save_net
from genserve.models.image.digits import splits

log = logging.getLogger(__name__)

TARGETS = {"gan": "genserve-gan", "vae": "genserve-vae", "flow": "genserve-flow",
           "digits-classifier": "digits-classifier"}


def _machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {threads} threads, torch {torch.__version__}"


def _fit(target: str, minutes: float, seed: int, max_steps: int | None) -> tuple[torch.nn.Module, dict, object]:
    train, held = splits()
    if target == "digits-classifier":
        from genserve.models.image.classifier import ClassifierTrainConfig, fit
        cfg = ClassifierTrainConfig(minutes=minutes, seed=seed, max_steps=max_steps)
    elif target == "gan":
        from genserve.models.image.gan import GANTrainConfig, fit
        cfg = GANTrainConfig(minutes=minutes, seed=seed, max_steps=max_steps)
    elif target == "vae":
        from genserve.models.image.vae import VAETrainConfig, fit
        cfg = VAETrainConfig(minutes=minutes, seed=seed, max_steps=max_steps)
    elif target == "flow":
        from genserve.models.image.flow import FlowTrainConfig, fit
        cfg = FlowTrainConfig(minutes=minutes, seed=seed, max_steps=max_steps)
    else:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    net, report = fit(train, held, cfg)
    return net, report, cfg


def train_image_model(target: str, out: Path, minutes: float, seed: int = 0, threads: int = 1,
                      max_steps: int | None = None, evaluate: bool = True) -> dict:
    """Trains ``target`` for ``minutes`` (or ``max_steps``), saves it to ``out``, evaluates generators; the report."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.time()
        net, report, cfg = _fit(target, minutes, seed, max_steps)
        save_net(net, TARGETS[target], out)
        train, _ = splits()
        report = {"model": TARGETS[target], "command": f"genserve train {target} --minutes {minutes:g} "
                  f"--threads {threads} --seed {seed}", **report, "minutes_total": round((time.time() - t0) / 60, 2),
                  "parameters": sum(p.numel() for p in net.parameters()),
                  "file_bytes": (out / "model.safetensors").stat().st_size, "train_images": len(train),
                  "machine": _machine(threads), "config": asdict(cfg)}
        (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
        if target == "digits-classifier":
            (out / "README.md").write_text(classifier_card(report))
        elif evaluate and out.name != TARGETS[target]:
            log.warning("not evaluated: genserve eval images expects the directory to be named %s", TARGETS[target])
        elif evaluate:
            from genserve.models.image.evaluate import eval_images, format_table

            log.info("\n%s", format_table(eval_images(TARGETS[target], root=out.parent)))
        return report
    finally:
        torch.set_num_threads(previous)


def classifier_card(report: dict) -> str:
    return f"""# digits-classifier

A small CNN (3 convolutions, a 128-unit ReLU layer, a linear head; {report['parameters']:,} parameters,
`models/image/classifier.py`) trained on the train split of scikit-learn's handwritten digits
({report['train_images']} images, 8×8, 17 grey levels). It is not served: `genserve eval images` uses
its 128-unit penultimate layer as the feature space of FID (in place of Inception, which knows
nothing of 8×8 digits) and its prediction to check that a sample of class c looks like a c.

- Command: `{report['command']}`; {report['steps']} steps of {report['config']['batch_size']} in
  {report['train_seconds']:.0f} s on {report['machine']}; one-pixel shift augmentation; last step shipped.
- Held-out accuracy ({report['heldout_images']} images, stratified 20 % split, seed 0):
  **{report['heldout_accuracy']:.4f}**; train accuracy {report['train_accuracy']:.4f}.
"""
