"""Embeddings: schema → backend → ``_checked`` → OpenAI's list of vectors (floats, or base64 of little-endian
float32 as OpenAI encodes them)."""

from __future__ import annotations

import base64
from typing import Any, cast

import numpy as np
from fastapi import Request

from genserve.app.backends.base import EmbeddingBackend, EmbeddingResult
from genserve.app.backends.manager import ModelManager
from genserve.app.errors import InvalidRequestError
from genserve.app.metrics import Metrics
from genserve.app.schemas.base import UsageInfo
from genserve.app.schemas.embeddings import EmbeddingData, EmbeddingRequest, EmbeddingResponse
from genserve.app.serving.common import Deadline, unless_disconnected
from genserve.app.settings import Settings
from genserve.app.tenancy import note_usage


class EmbeddingServing:
    def __init__(self, manager: ModelManager, metrics: Metrics, settings: Settings) -> None:
        self.manager, self.metrics, self.settings = manager, metrics, settings

    async def embeddings(self, body: EmbeddingRequest, raw: Request) -> Any:
        backend = await self.manager.acquire(body.model, "embedding", EmbeddingBackend)
        # The schema makes the inputs of one request all strings or all token lists.
        inputs = cast(list[str] | list[list[int]], body.inputs())
        limit = backend.entry.limits.max_inputs
        if len(inputs) > limit:
            raise InvalidRequestError(f"{len(inputs)} inputs exceed this model's limit of {limit} per request.",
                                      param="input")
        deadline = Deadline.start(backend.entry.timeout_s(self.settings.request_timeout_s), self.manager)

        async def run() -> EmbeddingResponse:
            result = self._checked(await deadline.run(backend.embed(inputs, body.dimensions)))
            self.metrics.prompt_tokens.labels(body.model).inc(result.prompt_tokens)
            note_usage("embedding", result.prompt_tokens)
            data = [EmbeddingData(index=i, embedding=_encode(v, body.encoding_format))
                    for i, v in enumerate(result.vectors)]
            return EmbeddingResponse(data=data, model=body.model, usage=UsageInfo(
                prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens))

        return await unless_disconnected(raw, run())

    @staticmethod
    def _checked(result: EmbeddingResult) -> EmbeddingResult:
        """The one point a backend's result passes before the response is made of it (where output
        checks go; vectors carry no content to moderate or mark today)."""
        return result


def _encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector
