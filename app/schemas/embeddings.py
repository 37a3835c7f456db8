"""``POST /v1/embeddings``."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from app.schemas.base import OpenAIBaseModel, UsageInfo

EMBEDDING_EXAMPLE = {"model": "all-minilm-l6-v2", "input": ["A red apple", "The json module"]}


class EmbeddingRequest(OpenAIBaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [EMBEDDING_EXAMPLE]})

    model: str
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, a list of texts, or token ids of the model's own tokenizer")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, value: object) -> object:
        if isinstance(value, list) and not value:
            raise ValueError("the input list is empty")
        if isinstance(value, list) and any(isinstance(x, (str, list)) and not x for x in value):
            raise ValueError("inputs must not be empty")
        if value == "":
            raise ValueError("the input must not be empty")
        return value

    def inputs(self) -> list[str] | list[list[int]]:
        v = self.input
        if isinstance(v, str):
            return [v]
        if all(isinstance(x, int) for x in v):
            return [list(v)]  # type: ignore[list-item]
        return list(v)  # type: ignore[return-value]


class EmbeddingData(OpenAIBaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: UsageInfo
