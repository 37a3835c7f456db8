"""The one pydantic base every public schema derives from.

Strict types (``"5"`` is not an integer, ``true`` is not a number) as OpenAI's API checks them, except
that a float with no fractional part is an integer (``1.0``), as JSON Schema, which the OpenAPI document
speaks, counts it; unknown fields are ignored, as the issue asks and OpenAI SDK extras need. Every text in a request is
valid Unicode: JSON can carry a lone surrogate (``"\\ud800"``), which no tokenizer, encoder or JSON
response can take, so it is a 400 naming the field here, once for every schema.
"""

from __future__ import annotations

import functools
import re
import typing
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from typing_extensions import TypeIs

from genserve.models.seeding import MAX_REQUEST_SEED

_SURROGATE = re.compile("[\ud800-\udfff]")


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        if isinstance(data, dict) and (names := _integer_fields(cls) & data.keys()):
            data = {**data, **{name: _as_ints(data[name]) for name in names}}
        return data

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value: Any, info: ValidationInfo) -> Any:
        where = _lone_surrogate(value, info.field_name or "")
        if where is not None:
            raise ValueError(f"not valid Unicode: a lone surrogate {where}; send text as UTF-8 code points")
        return value


def only_when_streaming(value: Any, info: ValidationInfo) -> Any:
    """A stream-only field (declared after ``stream``) set on a request that does not stream: OpenAI's 400
    for ``stream_options`` ("only allowed when 'stream' is enabled"), rather than a setting ignored."""
    if value and not info.data.get("stream"):
        raise ValueError("only allowed when 'stream' is true")
    return value


@functools.cache
def _integer_fields(cls: type[BaseModel]) -> frozenset[str]:
    """The fields of ``cls`` whose type holds integers and no floats (``int``, ``list[int]``, token ids)."""
    def kinds(annotation: Any) -> set[type]:
        if annotation in (int, float):
            return {annotation}
        return {k for arg in typing.get_args(annotation) for k in kinds(arg)}

    return frozenset(name for name, field in cls.model_fields.items()
                     if (found := kinds(field.annotation)) and int in found and float not in found)


def _as_ints(value: Any) -> Any:
    """Integral floats as ints, in lists too (token ids); anything else as it was, for validation to judge."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_as_ints(v) for v in value]
    return value


def _lone_surrogate(value: Any, path: str) -> str | None:
    """Where in ``value`` (texts, lists and mappings of them) a lone surrogate is, or None. Nested
    schemas check their own fields."""
    if isinstance(value, str):
        if value.isascii() or (found := _SURROGATE.search(value)) is None:
            return None
        return f"(U+{ord(found.group()):04X}) at character {found.start()} of {path}"
    if isinstance(value, list):
        if value and isinstance(value[0], int | float):  # token ids, numbers: no text (lists are uniform)
            return None
        for i, item in enumerate(value):
            if isinstance(item, str | list | dict) and (where := _lone_surrogate(item, f"{path}[{i}]")):
                return where
    elif isinstance(value, dict):
        for key, item in value.items():
            if where := _lone_surrogate(key, f"{path} (a key)") or _lone_surrogate(item, f"{path}[{key!r}]"):
                return where
    return None


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


# The integers every JSON parser keeps exactly (JavaScript's safe integers): clients and schema tools that
# read JSON numbers as doubles would change a larger seed, and with it the output.
Seed = Annotated[int, Field(ge=-MAX_REQUEST_SEED, le=MAX_REQUEST_SEED)]
# Below this a temperature only divides logits into overflow (NaN probabilities, a junk token): text
# models treat it as 0 (greedy, as OpenAI treats 0); samplers without a greedy mode refuse it.
MIN_TEMPERATURE = 1e-4
Temperature = Field(1.0, ge=0.0, le=2.0, description=f"0 means greedy (so does anything below {MIN_TEMPERATURE})")
# A positive temperature for the samplers that have no greedy mode (music, molecules).
PositiveTemperature = Field(1.0, ge=MIN_TEMPERATURE, le=2.0, description="sampling temperature")
TopP = Field(1.0, gt=0.0, le=1.0)
Penalty = Field(0.0, ge=-2.0, le=2.0)
