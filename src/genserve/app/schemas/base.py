"""The one pydantic base every public schema derives from.

Strict types (``"5"`` is not an integer, ``true`` is not a number) as OpenAI's API checks them;
unknown fields are ignored, as the issue asks and OpenAI SDK extras need.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypeIs


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


TextsOrTokens = str | list[str] | list[int] | list[list[int]]


def check_texts_or_tokens(value: TextsOrTokens, what: str, allow_empty_text: bool) -> TextsOrTokens:
    """One text, a list of texts, one token-id list or a list of them: none of them empty."""
    if isinstance(value, list) and not value:
        raise ValueError(f"the {what} list is empty")
    members = value if isinstance(value, list) and not isinstance(value[0], int) else [value]
    for m in members:
        if isinstance(m, list) and not m:
            raise ValueError(f"a token-id {what} is empty")
        if m == "" and not allow_empty_text:
            raise ValueError(f"an empty {what} text is not allowed")
    return value


def as_batch(value: TextsOrTokens) -> list[str | list[int]]:
    """The members of a ``TextsOrTokens`` value, a bare text or token list becoming a batch of one."""
    if isinstance(value, str):
        return [value]
    if _is_token_list(value):
        return [value]
    return list(value)


def _is_token_list(value: list[str] | list[int] | list[list[int]]) -> TypeIs[list[int]]:
    return bool(value) and isinstance(value[0], int)


Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Temperature = Field(1.0, ge=0.0, le=2.0, description="0 means greedy")
TopP = Field(1.0, gt=0.0, le=1.0)
Penalty = Field(0.0, ge=-2.0, le=2.0)
