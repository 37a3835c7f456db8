"""``GET /v1/models``: OpenAI's model object plus what genserve knows about it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from genserve.app.schemas.base import OpenAIBaseModel


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "genserve"
    modality: str
    tasks: list[str]
    ready: bool
    backend: str
    context_length: int | None = None
    sample_rate: int | None = Field(None, description="audio models: samples per second of the audio the model "
                                    "makes (speech is resampled to 24 kHz on the way out)")


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
