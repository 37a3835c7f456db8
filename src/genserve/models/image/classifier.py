"""``digits-classifier``: a small CNN trained on the digits train split, for evaluation only.

Its penultimate layer (``features``, 128 ReLU units) stands in for Inception-v3's pool features in
the Fréchet distance of Heusel et al. 2017 ("GANs trained by a two time-scale update rule converge to
a local Nash equilibrium"): Inception was trained on 299×299 photographs and says little about 8×8
digits. Its softmax says which digit a generated sample looks like. Trained with one-pixel shifts as
augmentation; the shipped weights are the last step's (no selection on the held-out split).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genserve.models.common.training import fit_classifier
from genserve.models.image.digits import Split, shift_augment

log = logging.getLogger(__name__)


@dataclass
class ClassifierConfig:
    width: int = 32
    features: int = 128
    classes: int = 10


class DigitClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.convs = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),  # (B, w, 8, 8)
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),  # (B, 2w, 4, 4)
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),  # (B, 2w, 4, 4)
        )
        self.fc = nn.Linear(2 * w * 16, config.features)
        self.head = nn.Linear(config.features, config.classes)
        self.dropout = nn.Dropout(0.3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 8, 8) intensities in [0, 1] → (B, features): the FID embedding."""
        return F.relu(self.fc(self.convs(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # (B, classes) logits


@torch.no_grad()
def predict(net: DigitClassifier, x: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, F), predicted class (N,)) for intensities (N, 1, 8, 8) in [0, 1]."""
    net.eval()
    feats = torch.cat([net.features(b) for b in x.split(batch_size)])
    return feats, net.head(feats).argmax(-1)


@dataclass
class ClassifierTrainConfig:
    minutes: float = 1.5
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.02
    warmup_steps: int = 50
    weight_decay: float = 0.05
    seed: int = 0
    eval_every: int = 200


def fit(train: Split, held: Split, cfg: ClassifierTrainConfig) -> tuple[DigitClassifier, dict]:
    """Cross-entropy for ``cfg.minutes`` (or ``max_steps``); returns the net and its training report."""
    torch.manual_seed(cfg.seed)
    net = DigitClassifier(ClassifierConfig())
    steps, seconds, curve = fit_classifier(net, train.unit(), train.labels, shift_augment, lambda: accuracy(net, held),
                                           "heldout_accuracy", cfg)
    return net.eval(), {"steps": steps, "train_seconds": round(seconds, 1),
                        "train_accuracy": accuracy(net, train), "heldout_accuracy": curve[-1]["heldout_accuracy"],
                        "heldout_images": len(held), "curve": curve}


def accuracy(net: DigitClassifier, split: Split) -> float:
    return (predict(net, split.unit())[1] == split.labels).float().mean().item()


def card(report: dict) -> str:
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
