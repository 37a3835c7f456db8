"""``emoji-classifier``: a small CNN that names an emoji, for evaluating ``genserve-diffusion`` only.

It maps a 32×32 RGB image in [0, 1] to 128 ReLU features (``features``: the embedding of the
Fréchet distance in ``models/diffusion/evaluate.py``, in place of Inception-v3's pool features, which
were learnt on 299×299 photographs) and to logits over every emoji of the set: one class per emoji
name, 1358 in all, *train and held-out names alike*. It is a measuring instrument, not a model of
the data: it has to know the held-out emoji to say whether a sample prompted with a held-out name
shows it. The generator never sees a held-out image; only this classifier does.

With one image per class, training leans on augmentation that resembles the flaws of generated
samples: shifts of up to ±2 px and rescaling by 0.85–1.15 (white fill), a little blur, Gaussian
pixel noise, and brightness, contrast and saturation jitter (:func:`augment`); a quarter of the
samples are left clean. The shipped weights are the last step's. ``genserve train emoji-classifier`` writes
``models/weights/emoji-classifier/`` (config.json with the class names, model.safetensors,
training_report.json, README.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genserve.models.common.reports import machine, write_report
from genserve.models.common.training import fit_classifier
from genserve.models.common.weights import load_net, save_net

log = logging.getLogger(__name__)

NAME = "emoji-classifier"
AUGMENTED_SEED = 1234  # the fixed augmented copy of the set that the report's accuracy is measured on


@dataclass
class EmojiClassifierConfig:
    width: int = 32
    features: int = 128
    names: list[str] = field(default_factory=list)  # class i is the emoji named names[i]


class EmojiClassifier(nn.Module):
    def __init__(self, config: EmojiClassifierConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.ReLU()]

        self.convs = nn.Sequential(
            *block(3, w, 1),  # (B, w, 32, 32)
            *block(w, 2 * w, 2),  # (B, 2w, 16, 16)
            *block(2 * w, 4 * w, 2),  # (B, 4w, 8, 8)
            *block(4 * w, w, 2),  # (B, w, 4, 4)
        )
        self.fc = nn.Linear(w * 16, config.features)
        self.head = nn.Linear(config.features, len(config.names))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) in [0, 1] → (B, features): the FID embedding."""
        return F.relu(self.fc(self.convs(x * 2 - 1).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, classes) logits


@torch.no_grad()
def predict(net: EmojiClassifier, x: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, F), logits (N, classes)) of images (N, 3, 32, 32) in [0, 1]."""
    net.eval()
    feats = torch.cat([net.features(b) for b in x.float().split(batch_size)])
    return feats, net.head(feats)


def load_classifier(path: Path) -> EmojiClassifier:
    return load_net(path, EmojiClassifierConfig, EmojiClassifier)


def augment(x: torch.Tensor, g: torch.Generator, clean: float = 0.1) -> torch.Tensor:
    """Random imperfections of (B, 3, 32, 32) images in [0, 1], drawn from ``g``; a ``clean`` share untouched."""
    b = x.shape[0]

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=g)

    # shift (±2 px) and rescale (0.85–1.15) about the centre, filling with white: warp 1 − x, padded with 0
    scale = uniform(0.85, 1.15)
    shift = uniform(-2, 2, 2) * 2 / x.shape[-1]  # pixels → grid units
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = -shift / scale[:, None]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = 1 - F.grid_sample(1 - x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # slight blur: a mix with a 3×3 binomial blur
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    y = torch.lerp(y, blurred, uniform(0, 0.8, 1, 1, 1))
    # brightness, contrast, saturation
    y = y + uniform(-0.08, 0.08, 1, 1, 1)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = mean + uniform(0.8, 1.2, 1, 1, 1) * (y - mean)
    grey = y.mean(dim=1, keepdim=True)
    y = grey + uniform(0.7, 1.3, 1, 1, 1) * (y - grey)
    # Gaussian pixel noise, σ up to 0.05
    y = y + uniform(0, 0.05, 1, 1, 1) * torch.randn(y.shape, generator=g)
    y = y.clamp(0, 1)
    keep = torch.rand(b, generator=g) < clean
    return torch.where(keep[:, None, None, None], x, y)


@dataclass
class EmojiClassifierTrainConfig:
    minutes: float = 3.0
    max_steps: int | None = None
    batch_size: int = 128
    clean: float = 0.25  # share of each batch left unaugmented
    lr: float = 2e-3
    min_lr_ratio: float = 0.02
    warmup_steps: int = 50
    weight_decay: float = 0.01
    width: int = 32
    seed: int = 0
    eval_every: int = 100


def accuracy(net: EmojiClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict(net, x)[1].argmax(-1) == y).float().mean().item()


def fit(images: torch.Tensor, names: list[str], cfg: EmojiClassifierTrainConfig) -> tuple[EmojiClassifier, dict]:
    """Cross-entropy on augmented copies of ``images`` (N, 3, 32, 32) uint8, class i = ``names[i]``,
    for ``cfg.minutes`` (or ``max_steps``); the net and its training report."""
    torch.manual_seed(cfg.seed)
    net = EmojiClassifier(EmojiClassifierConfig(width=cfg.width, names=list(names)))
    x, y = images.float() / 255, torch.arange(len(names))
    fixed = augment(x, torch.Generator().manual_seed(AUGMENTED_SEED), clean=0.0)
    steps, seconds, curve = fit_classifier(net, x, y, lambda batch, g: augment(batch, g, cfg.clean),
                                           lambda: accuracy(net, fixed, y), "augmented_accuracy", cfg)
    return net.eval(), {
        "steps": steps,
        "train_seconds": round(seconds, 1),
        "classes": len(names),
        "clean_accuracy": accuracy(net, x, y),
        "augmented_accuracy": curve[-1]["augmented_accuracy"],
        "augmented_seed": AUGMENTED_SEED,
        "curve": curve,
    }


def train_emoji_classifier(
    out: Path, minutes: float = 3.0, seed: int = 0, threads: int = 1, max_steps: int | None = None
) -> dict:
    """Trains on every emoji of the font, saves ``out`` and writes its report and card; the report."""
    from genserve.models.diffusion.data import load_emoji

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.time()
        data = load_emoji()
        cfg = EmojiClassifierTrainConfig(minutes=minutes, seed=seed, max_steps=max_steps)
        net, report = fit(data.images, data.names, cfg)
        save_net(net, NAME, out)
        report = {
            "model": NAME,
            "command": f"genserve train {NAME} --minutes {minutes:g} --threads {threads} --seed {seed}",
            **report,
            "minutes_total": round((time.time() - t0) / 60, 2),
            "parameters": sum(p.numel() for p in net.parameters()),
            "file_bytes": (out / "model.safetensors").stat().st_size,
            "machine": machine(threads),
            "config": asdict(cfg),
        }
        write_report(out, report, card(report))
        log.info(
            "saved %s: clean accuracy %.4f, augmented %.4f after %d steps",
            out,
            report["clean_accuracy"],
            report["augmented_accuracy"],
            report["steps"],
        )
        return report
    finally:
        torch.set_num_threads(previous)


def card(report: dict) -> str:
    return f"""# emoji-classifier

A small CNN (4 convolutions with GroupNorm, a 128-unit ReLU layer, a linear head over
{report["classes"]} classes; {report["parameters"]:,} parameters, `models/diffusion/classifier.py`)
trained to name each emoji of the Noto Color Emoji font at 32×32: one class per emoji, the
genserve-diffusion training names **and its held-out names** (a measuring instrument: the generator
never sees a held-out image). It is not served: `genserve eval images --model genserve-diffusion`
uses its 128-unit layer as the feature space of FID (not Inception) and its prediction to check that
a sample looks like the emoji its prompt names.

- Command: `{report["command"]}`; {report["steps"]} steps of {report["config"]["batch_size"]} in
  {report["train_seconds"]:.0f} s on {report["machine"]}; last step shipped.
- Augmentation (one image per class): shifts up to ±2 px, rescaling 0.85–1.15 (white fill), slight
  blur, Gaussian pixel noise, brightness/contrast/saturation jitter; {report["config"]["clean"]:.0%} of the samples
  left clean.
- Accuracy on the clean images: **{report["clean_accuracy"]:.4f}**; on one fixed augmented copy of the
  set (seed {report["augmented_seed"]}): **{report["augmented_accuracy"]:.4f}**.
"""
