"""Fields that completions and chat share, and their conversion to internal ``SamplingParams``."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, field_validator

from genserve.app.schemas.base import (
    MIN_TEMPERATURE,
    OpenAIBaseModel,
    Penalty,
    Seed,
    StreamOptions,
    Temperature,
    TopP,
    only_when_streaming,
)
from genserve.models.text.sampling import SamplingParams


class SamplingFields(OpenAIBaseModel):
    model: str = Field(description="a model id from GET /v1/models")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float = Temperature
    top_p: float = TopP
    n: int = Field(1, ge=1, le=128, description="choices to generate for each prompt")
    stream: bool = False
    stream_options: Annotated[StreamOptions | None, AfterValidator(only_when_streaming)] = None
    stop: str | list[str] | None = Field(None, description="up to 4 sequences where generation stops")
    seed: Seed | None = None
    presence_penalty: float = Penalty
    frequency_penalty: float = Penalty
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions (vLLM's names)
    top_k: int = Field(-1, ge=-1, description="extension: sample from the k most likely tokens (-1: off)")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="extension")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="extension")
    ignore_eos: bool = Field(False, description="extension: keep generating past end-of-sequence")
    min_tokens: int = Field(0, ge=0, description="extension: suppress end-of-sequence before this many")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("temperature")
    @classmethod
    def _greedy_below_min(cls, value: float) -> float:
        return 0.0 if value < MIN_TEMPERATURE else value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return value

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=max(self.top_k, 0), min_p=self.min_p, n=self.n, seed=self.seed, stop=stops,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            logprobs=logprobs, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)
