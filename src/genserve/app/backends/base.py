"""What serving asks of a backend, whatever runs behind it.

A text backend turns a ``TextRequest`` into a stream of ``Delta`` events (new text of one choice)
closed by one ``Usage``; an embedding backend turns inputs into vectors. Serving builds the OpenAI
responses from these, so a local runner and a remote upstream look the same to it, and moderation
and metrics apply to both alike.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from genserve.app.errors import InvalidRequestError
from genserve.app.registry import ModelEntry
from genserve.models.text.sampling import SamplingParams

# A runner whose current step (or batch) has run this long is stuck: not ready.
STALL_SECONDS = 60.0


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Delta:
    index: int
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    num_tokens: int = 1  # tokens this text came from (a backend may merge several into one delta)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class TextRequest:
    request_id: str
    params: SamplingParams
    prompt: str | list[int] | None = None  # /v1/completions
    messages: list[dict[str, str]] | None = None  # /v1/chat/completions, content flattened to text


@dataclass
class EmbeddingResult:
    vectors: list[list[float]]
    prompt_tokens: int


def check_token_ids(rows: list[list[int]], vocab: int, param: str) -> None:
    """400 for token ids outside the model's vocabulary (naming the row when there are several)."""
    for i, row in enumerate(rows):
        bad = next((t for t in row if not 0 <= t < vocab), None)
        if bad is not None:
            where = f"{param}[{i}]" if len(rows) > 1 else param
            raise InvalidRequestError(f"Token id {bad} in {where} is outside the vocabulary (0..{vocab - 1}).",
                                      param=param)


class Backend:
    """One served model. ``setup`` runs once in a worker thread; ``close`` on shutdown."""

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

    def drain(self) -> None:
        """Shutdown has begun: fail queued work now with a 503 (running work may finish)."""

    async def close(self) -> None:
        pass

    def generate(self, request: TextRequest) -> AsyncIterator[Delta | Usage]:
        raise NotImplementedError

    async def embed(self, inputs: list[str] | list[list[int]], dimensions: int | None) -> EmbeddingResult:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"context_length": None}
