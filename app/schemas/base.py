"""The one pydantic base every public schema derives from.

Strict types (``"5"`` is not an integer, ``true`` is not a number) as OpenAI's API checks them;
unknown fields are ignored, as the issue asks and OpenAI SDK extras need.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ErrorDetail(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorDetail


SEED_RANGE = {"ge": -(2**63), "le": 2**63 - 1}
Temperature = Field(1.0, ge=0.0, le=2.0, description="0 means greedy")
TopP = Field(1.0, gt=0.0, le=1.0)
Penalty = Field(0.0, ge=-2.0, le=2.0)
