"""What a request asks of a model, once the API's schema has been checked: plain dataclasses that the
serving layer builds, every backend (local, remote) takes, and the model runners read.

These are the only ``genserve.models`` types that ``genserve.app.serving`` may import (besides
``SamplingParams``, the text engine's own params). They hold no tensors of the caller's making and
no HTTP: a remote backend turns them back into genserve's public API, a local one into model calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from genserve.models.audio import SpeechSpec
from genserve.models.text.sampling import SamplingParams

__all__ = [
    "ImageInterpolationParams",
    "ImageJob",
    "ImageParams",
    "ModerationParams",
    "MoleculeInterpolationParams",
    "MoleculeParams",
    "MusicParams",
    "SamplingParams",
    "SpeechParams",
    "SpeechSpec",
    "TextParams",
]


@dataclass
class TextParams:
    """One completion or chat request (``n`` choices, in ``params``)."""

    request_id: str
    params: SamplingParams
    prompt: str | list[int] | None = None  # /v1/completions
    messages: list[dict[str, str]] | None = None  # /v1/chat/completions, content flattened to text
    # Whether the caller sends the text as it comes; False: it answers once the text is whole, so a backend
    # may make it whole before handing it on (a Ray replica does, so that a call can be retried whole).
    streamed: bool = True


@dataclass
class ImageJob:
    """One image to make. A request for ``n`` images is ``n`` jobs with seeds ``seed + k``."""

    prompt: str
    seed: int
    width: int
    height: int
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    class_index: int | None = None
    image: np.ndarray | None = None  # edits: (H, W, 3) uint8 at the size the pipeline takes
    mask: np.ndarray | None = None   # inpainting: (H, W) float in [0, 1], 1 = repaint; None: image-to-image
    strength: float | None = None    # edits: how much of the image is redone (default: the pipeline's)
    on_step: Callable[[int, int], None] | None = field(default=None, compare=False)

    def key(self) -> tuple:
        """Jobs with equal keys can share one forward pass."""
        kind = "generate" if self.image is None else "image-to-image" if self.mask is None else "inpaint"
        return (self.width, self.height, self.steps, self.scheduler, self.guidance_scale, kind, self.strength)


@dataclass
class ImageParams:
    """A generation or edit request: its jobs, plus what a remote backend needs to forward it as sent."""

    jobs: list[ImageJob]
    size: str | None = None           # the request's ``size`` as given ("auto" / None: the model's own)
    stream: bool = False              # progress events wanted (diffusion models)
    upload: bytes | None = None       # edits: the image file as uploaded
    upload_mask: bytes | None = None  # edits: the mask file as uploaded, if any


@dataclass
class ImageInterpolationParams:
    seed_start: int
    seed_end: int
    frames: int
    method: Literal["slerp", "lerp"]
    class_name: str | None
    format: Literal["png", "gif"]
    width: int = 0    # every frame's size (0: the model's native size)
    height: int = 0
    size: str | None = None  # the request's ``size`` as given, for a remote backend to forward


@dataclass
class SpeechParams:
    """Text to speak. ``voice`` is the caller's name for it (OpenAI's or the model's own)."""

    text: str
    voice: str
    speed: float
    response_format: str
    seed: int | None = None


@dataclass
class MusicParams:
    seconds: float
    tempo: float
    key: str
    temperature: float
    seed: int
    response_format: str


@dataclass
class MoleculeParams:
    """A molecule generation request. ``constraints`` and ``include`` are the API's, as dicts/lists."""

    request_id: str
    n: int
    seed: int
    temperature: float
    top_k: int
    unique: bool
    max_samples: int
    constraints: dict | None = None
    include: list[str] = field(default_factory=list)
    max_seconds: float | None = None  # sampling time budget; what was found by then is returned


@dataclass
class MoleculeInterpolationParams:
    start: str
    end: str
    steps: int
    method: Literal["slerp", "lerp"]
    include: list[str] = field(default_factory=list)  # "properties", "svg": what each point carries


@dataclass
class ModerationParams:
    """What to classify: texts and images (RGB uint8 arrays), each its own input with its own result."""

    texts: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
