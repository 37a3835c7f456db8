"""``POST /v1/embeddings``."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator
from pydantic.json_schema import JsonDict

from genserve.app.schemas.base import OpenAIBaseModel, TextsOrTokens, UsageInfo, as_batch, check_texts_or_tokens

EMBEDDING_EXAMPLE: JsonDict = {"model": "all-minilm-l6-v2", "input": ["A red apple", "The json module"]}


class EmbeddingRequest(OpenAIBaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [EMBEDDING_EXAMPLE]})

    model: str
    input: TextsOrTokens = Field(
        description="text, a list of texts, or token ids of the model's own tokenizer")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="the model's own embedding size, or unset: a model "
                                   "that cannot shorten its embeddings refuses any other size with a 400")
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, value: TextsOrTokens) -> TextsOrTokens:
        return check_texts_or_tokens(value, "input", allow_empty_text=False)

    def inputs(self) -> list[str | list[int]]:
        return as_batch(self.input)


class EmbeddingData(OpenAIBaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: UsageInfo
