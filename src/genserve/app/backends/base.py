"""What serving asks of a backend, whatever runs behind it: one lifecycle, one Protocol per modality,
and the typed events every backend yields.

A backend is one served model. Local backends run it in this process (or the engine's), remote
ones forward to another genserve or any OpenAI-compatible server; ``ray`` ones (later) call a Ray
Serve deployment. Serving knows a backend only through the Protocol of its modality, which
``ModelManager.get(model, task, kind)`` returns, and its ``describe()`` facts. So the output checks
(moderation, provenance) sit at one place per modality, on these event streams:

=========  ==========================================  ==========================================
modality   Protocol method                             events, in order
=========  ==========================================  ==========================================
text       ``TextBackend.generate(TextParams)``        ``Delta``\\* then one ``Usage``
embedding  ``EmbeddingBackend.embed(...)``             one ``EmbeddingResult``
image      ``ImageBackend.generate(ImageParams)``      ``Progress``\\* (only when ``params.stream``)
                                                       then one ``ImageArtifact`` per job, in order
image      ``ImageBackend.interpolate(...)``           ``ImageArtifact``\\* (frames, or one GIF)
speech     ``SpeechBackend.speak(SpeechParams)``       ``AudioChunk``\\* (samples, or encoded bytes)
music      ``MusicBackend.compose(MusicParams)``       one ``AudioChunk``: MIDI ``encoded`` for
                                                       ``mid``, else samples (or an upstream's bytes)
molecule   ``MoleculeBackend.generate(...)``           ``Molecule``\\* then one ``MoleculeStats``
molecule   ``MoleculeInterpolationBackend``            the path's points as ``Molecule``\\* (a list)
           ``.interpolate(...)``
moderation ``ModerationBackend.classify(...)``         one ``ModerationResult`` per input
=========  ==========================================  ==========================================

``serving/<modality>.py`` turns these into wire formats (``serving/media.py`` encodes media). In each
serving module a backend's events pass through one ``_checked`` method per Protocol method
(``TextServing._checked``, ``EmbeddingServing._checked``, ``ImageServing._checked`` for generation,
edits and interpolation, ``AudioServing._checked`` for speech and ``_checked_piece`` for music,
``MoleculeServing._checked`` for generation and ``_checked_path`` for interpolation) before any wire
format is made: that is where output moderation and provenance marks go, for every backend alike.

A caller's bad value is found as early as the knowledge allows: serving checks the registry entry's
limits and the ``describe()`` facts it has (where a fact is None, it leaves the check to the
backend); the backend checks what only the model knows (a voice, a key, a class name, constraints)
and raises ``InvalidRequestError`` naming the parameter before it yields anything.

Streams are ``AsyncGenerator``s, so that serving can close one it stops reading (a client that left,
a deadline passed) and the backend stops its work at once.

Departures from the first draft of this contract: ``Molecule.smiles`` is None for a point of a latent
path that decodes to no molecule, and molecule interpolation returns ``Molecule`` points (SELFIES,
SMILES, properties and depictions as ``include`` asks) instead of bare SELFIES, so that its output
passes the same checks as generation and a remote backend returns its upstream's points as they came;
``ModelFacts.can_inpaint`` and ``can_vary`` are None where unknown, like every other fact.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from genserve.app.errors import InvalidRequestError
from genserve.app.registry import ModelEntry
from genserve.models.params import (
    ImageInterpolationParams,
    ImageParams,
    ModerationParams,
    MoleculeInterpolationParams,
    MoleculeParams,
    MusicParams,
    SpeechParams,
    TextParams,
)

# A runner whose current step (or batch) has run this long is stuck: not ready.
STALL_SECONDS = 60.0


# facts ------------------------------------------------------------------------------------------
@dataclass
class ModelFacts:
    """What ``GET /v1/models`` and serving's checks may know of a model beyond its registry entry.
    A field is None where the backend does not know it (a remote upstream that did not say)."""

    context_length: int | None = None
    sample_rate: int | None = None           # audio: samples per second the model makes
    sizes: list[tuple[int, int]] | None = None  # images: (width, height) the model serves
    native_size: tuple[int, int] | None = None  # images: what ``size: auto`` gives
    image_kind: Literal["diffusion", "latent"] | None = None  # diffusion: steps, guidance, schedulers
    class_names: list[str] | None = None     # class-conditional image models: what ``prompt`` may name
    can_inpaint: bool | None = None
    can_vary: bool | None = None             # image-to-image
    edit_at_native_size: bool = True         # uploads are resized to ``native_size`` (pixel-space models)
    training_set_size: int | None = None     # molecule generators: for ``novel``
    extra: dict[str, object] = field(default_factory=dict)


# events -----------------------------------------------------------------------------------------
@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Delta:
    """New text of one choice. ``token_ids`` where the backend knows them (local engines)."""

    index: int
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    num_tokens: int = 1  # tokens this text came from (a backend may merge several into one delta)
    token_ids: list[int] | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class EmbeddingResult:
    vectors: list[list[float]]
    prompt_tokens: int


@dataclass
class Progress:
    """A denoising step of the batch a request runs in."""

    step: int
    total: int


@dataclass
class ImageArtifact:
    """One finished image (or animation). ``pixels`` where this process made it; ``encoded`` where an
    upstream sent finished bytes, passed through unchanged (so a gateway returns what its upstream did)."""

    pixels: np.ndarray | None = None  # (H, W, 3) uint8
    encoded: bytes | None = None
    media_type: str = "image/png"
    seed: int | None = None
    frames: np.ndarray | None = None  # an animation's (F, H, W, 3) uint8 frames, encoded as one GIF


@dataclass
class AudioChunk:
    """Audio in order: mono float32 ``samples`` at ``sample_rate``, or ``encoded`` bytes already in the
    request's ``response_format`` (an upstream's, or a format that is not audio, such as MIDI)."""

    samples: np.ndarray | None = None
    sample_rate: int | None = None
    encoded: bytes | None = None
    residual_tempo: float = 1.0  # speed the encoder must still apply (below the synthesiser's range)
    seed: int | None = None


@dataclass
class Molecule:
    """A kept molecule, as the API returns it (``properties`` rounded, ``svg`` when asked)."""

    smiles: str | None  # None: a path point that decodes to no molecule (interpolation only)
    selfies: str
    properties: dict[str, float | int] | None = None
    novel: bool | None = None
    similarity: float | None = None
    svg: str | None = None


@dataclass
class MoleculeStats:
    """Every string drawn, accounted for; closes a molecule generation stream."""

    requested: int
    returned: int
    sampled: int
    invalid: int
    duplicates: int
    rejected_by_constraints: int
    withheld_by_moderation: int
    stopped_by: Literal["n", "max_samples", "time"]
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ModerationResult:
    """One input's verdict in OpenAI's 13 moderation categories (``harassment``, ``self-harm/intent``, ...):
    every category present, scores in [0, 1]."""

    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    input_type: Literal["text", "image"] = "text"


TextEvent = Delta | Usage
ImageEvent = Progress | ImageArtifact
MoleculeEvent = Molecule | MoleculeStats


# lifecycle --------------------------------------------------------------------------------------
class Backend:
    """One served model. ``setup`` runs once in a worker thread, then ``start`` on the event loop;
    ``drain`` when shutdown begins, ``close`` at the end."""

    # True when the backend counts prompt/generated tokens and finish reasons itself, step by step
    # (a local engine); otherwise serving counts them from the events it receives.
    meters_tokens = False

    def __init__(self, entry: ModelEntry) -> None:
        self.entry = entry
        self.loaded = False
        self.load_error: str | None = None
        self.created = int(time.time())

    def setup(self) -> None:
        self.loaded = True

    async def start(self) -> None:
        """Starts background work on the event loop after ``setup``."""

    def ready(self) -> bool:
        return self.loaded

    async def check_ready(self) -> bool:
        return self.ready()

    def check_room(self, task: str) -> None:
        """The 429 this model's queue would give a request for ``task`` now, raised at admission: before
        moderation and any other work is spent on a request that cannot queue. The queue's own check
        still decides (a slot may go between the two)."""

    def drain(self) -> None:
        """Shutdown has begun: fail queued work now with a 503 (running work may finish)."""

    async def close(self) -> None:
        pass

    def describe(self) -> ModelFacts:
        return ModelFacts()


# one Protocol per modality ----------------------------------------------------------------------
@runtime_checkable
class ServedModel(Protocol):
    entry: ModelEntry
    loaded: bool
    load_error: str | None
    created: int
    meters_tokens: bool

    def ready(self) -> bool: ...
    async def check_ready(self) -> bool: ...
    def describe(self) -> ModelFacts: ...


class TextBackend(ServedModel, Protocol):
    def generate(self, request: TextParams) -> AsyncGenerator[TextEvent, None]: ...

    def stop_choice(self, request_id: str, index: int) -> bool:
        """Stop generating choice ``index`` of the running request ``request_id`` (moderation blocked it).
        True: it stops within a step and the request ends when its last choice has; False: the backend
        cannot stop one choice alone (an OpenAI upstream), so the caller closes the stream once it wants
        none of the choices."""
        ...

    async def decode(self, ids: list[int]) -> str | None:
        """Token ids as the model reads them (what input moderation checks of a token-id prompt); None
        where the backend has no tokenizer (an upstream)."""
        ...

    async def token_ids(self, text: str) -> tuple[list[int], int] | None:
        """``text`` as the model's token ids, with the width of its logits (what the text watermark is
        keyed on); None where the backend has no tokenizer here (an upstream) or has not loaded it yet."""
        ...


class EmbeddingBackend(ServedModel, Protocol):
    async def embed(self, inputs: list[str] | list[list[int]], dimensions: int | None) -> EmbeddingResult: ...


class ImageBackend(ServedModel, Protocol):
    def generate(self, params: ImageParams) -> AsyncGenerator[ImageEvent, None]: ...
    def interpolate(self, params: ImageInterpolationParams) -> AsyncGenerator[ImageArtifact, None]: ...


class SpeechBackend(ServedModel, Protocol):
    def speak(self, params: SpeechParams) -> AsyncGenerator[AudioChunk, None]: ...


class MusicBackend(ServedModel, Protocol):
    async def compose(self, params: MusicParams) -> AudioChunk: ...


class MoleculeBackend(ServedModel, Protocol):
    def generate(self, params: MoleculeParams) -> AsyncGenerator[MoleculeEvent, None]: ...


class MoleculeInterpolationBackend(ServedModel, Protocol):
    async def interpolate(self, params: MoleculeInterpolationParams) -> list[Molecule]: ...


class ModerationBackend(ServedModel, Protocol):
    """A moderation classifier (the ``moderation`` modality): one result per input, texts first, in
    order (``app/moderation/backend.py``)."""

    async def classify(self, params: ModerationParams) -> list[ModerationResult]: ...

    def applied_input_types(self, category: str) -> list[str]:
        """The input types (``text``, ``image``) this model judges ``category`` on."""
        ...


def check_token_ids(rows: list[list[int]], vocab: int, param: str) -> None:
    """400 for token ids outside the model's vocabulary (naming the row when there are several)."""
    for i, row in enumerate(rows):
        bad = next((t for t in row if not 0 <= t < vocab), None)
        if bad is not None:
            where = f"{param}[{i}]" if len(rows) > 1 else param
            raise InvalidRequestError(f"Token id {bad} in {where} is outside the vocabulary (0..{vocab - 1}).",
                                      param=param)
