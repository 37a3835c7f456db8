"""What the moderation layer asks of a classifier."""

from __future__ import annotations

from typing import Protocol

import numpy as np

# What warms every tier up: long enough for the semantic tier (``semantic.MIN_WORDS``), which shorter
# texts leave alone and so would leave unloaded until the first request.
WARM_UP_TEXT = "warm up every tier once"


class TextClassifier(Protocol):
    """A synchronous, CPU-cheap text classifier (run in a worker thread by the service).

    ``scores`` returns a score in [0, 1] for each of OpenAI's categories it has an opinion on
    (``categories.CATEGORIES``); categories it does not cover are left out. It must be thread-safe
    and never raise on any ``str`` (empty, very long, any script, lone surrogates)."""

    name: str

    def scores(self, text: str) -> dict[str, float]: ...


class ImageClassifier(Protocol):
    """A synchronous image classifier over a batch of (N, H, W, 3) uint8 RGB images: one score dict
    per image, in OpenAI's categories."""

    name: str

    def scores(self, images: np.ndarray) -> list[dict[str, float]]: ...


def stack_images(images: list[np.ndarray]) -> np.ndarray:
    """(H, W, 3) images of any sizes as one (N, H, W, 3) batch, smaller ones padded with black."""
    shapes = {im.shape for im in images}
    if len(shapes) == 1:
        return np.stack(images)
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    out = np.zeros((len(images), h, w, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i, : im.shape[0], : im.shape[1]] = im
    return out
