"""``POST /v1/completions`` (OpenAI's legacy completions)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from pydantic.json_schema import JsonDict

from genserve.app.schemas.base import OpenAIBaseModel, TextsOrTokens, UsageInfo, as_batch, check_texts_or_tokens
from genserve.app.schemas.provenance import Provenance
from genserve.app.schemas.sampling import SamplingFields
from genserve.models.text.sampling import SamplingParams

COMPLETION_EXAMPLE: JsonDict = {"model": "genserve-text-tiny", "prompt": "The json module", "max_tokens": 32,
                                "temperature": 0.7, "seed": 1}


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"examples": [COMPLETION_EXAMPLE]})

    prompt: TextsOrTokens = Field(
        description="text, a list of texts, or token ids (one list or a list of lists)")
    logprobs: int | None = Field(None, ge=0, le=5, description="log probabilities of this many top tokens")
    echo: bool = Field(False, description="not supported: false only", json_schema_extra={"enum": [False]})
    best_of: int | None = Field(None, ge=1, description="equal to n, or unset: genserve returns every sequence "
                                "it samples")
    suffix: str | None = Field(None, description="not supported: null or empty", json_schema_extra={"maxLength": 0})

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: TextsOrTokens) -> TextsOrTokens:
        return check_texts_or_tokens(value, "prompt", allow_empty_text=True)

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, value: object, info: ValidationInfo) -> object:
        if value:
            raise ValueError(f"{info.field_name} is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported")
        return value

    def prompts(self) -> list[str | list[int]]:
        return as_batch(self.prompt)

    def to_sampling_params(self) -> SamplingParams:
        # OpenAI's default for this endpoint is 16 tokens.
        return self.sampling_params(self.max_tokens or 16, self.logprobs)


class CompletionLogprobs(OpenAIBaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "content_filter"] | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
    provenance: Provenance | None = Field(None, description="genserve's extension: what marks the output "
                                          "carries (docs/provenance.md)")
