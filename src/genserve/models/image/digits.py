"""The data: scikit-learn's handwritten digits (``sklearn.datasets.load_digits``, the UCI optical
recognition test set: 1797 images of 8×8 pixels, 17 grey levels 0..16, ink high, ten classes),
split once, stratified by class, into 80 % train and 20 % held-out with a fixed seed."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

LEVELS = 17  # grey levels 0..16
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass(frozen=True)
class Split:
    levels: torch.Tensor  # (N, 1, 8, 8) float32 grey levels 0..16
    labels: torch.Tensor  # (N,) int64

    def unit(self) -> torch.Tensor:
        """Intensities in [0, 1]."""
        return self.levels / (LEVELS - 1)

    def __len__(self) -> int:
        return self.labels.shape[0]


@cache
def splits() -> tuple[Split, Split]:
    """(train, held-out), deterministic: stratified by class, ``SPLIT_SEED``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)  # (1797, 8, 8)
    idx_train, idx_held = train_test_split(np.arange(len(images)), test_size=HELDOUT_FRACTION,
                                           random_state=SPLIT_SEED, stratify=digits.target)

    def take(idx: np.ndarray) -> Split:
        return Split(torch.from_numpy(images[idx])[:, None].contiguous(), torch.from_numpy(digits.target[idx]).long())

    return take(idx_train), take(idx_held)


def validation_split(train: Split, fraction: float = 0.1) -> tuple[Split, Split]:
    """(fit, validation): a stratified ``fraction`` of the train split set aside to pick the checkpoint,
    so that the held-out split stays untouched by any choice made in training."""
    from sklearn.model_selection import train_test_split

    idx_fit, idx_val = train_test_split(np.arange(len(train)), test_size=fraction, random_state=SPLIT_SEED,
                                        stratify=train.labels.numpy())
    return (Split(train.levels[idx_fit], train.labels[idx_fit]), Split(train.levels[idx_val], train.labels[idx_val]))


def dequantize(levels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantisation: grey level g → (g + u) / 17 with u ~ U[0, 1), continuous in [0, 1).

    A density p on [0, 1)^D then bounds the discrete likelihood: -log P(g) ≤ E_u[-log p((g + u) / 17)]
    + D·log 17 (Theis et al. 2016, "A note on the evaluation of generative models").
    """
    u = torch.rand(levels.shape, generator=generator, device=levels.device, dtype=levels.dtype)
    return (levels + u) / LEVELS


def shift_augment(x: torch.Tensor, generator: torch.Generator | None = None, max_shift: int = 1) -> torch.Tensor:
    """Each image moved by up to ``max_shift`` pixels in each direction, zeros (no ink) filling in."""
    B, _, H, W = x.shape
    pad = torch.nn.functional.pad(x, (max_shift,) * 4)  # (B, 1, H + 2s, W + 2s)
    shifts = torch.randint(0, 2 * max_shift + 1, (B, 2), generator=generator)
    return torch.stack([pad[i, :, a:a + H, b:b + W] for i, (a, b) in enumerate(shifts.tolist())])
