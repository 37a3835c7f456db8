"""``POST /v1/moderations``: OpenAI's schema, every result carrying all 13 categories."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from genserve.app.schemas.base import OpenAIBaseModel


class ImageURL(OpenAIBaseModel):
    url: str = Field(description="a data URL (data:image/png;base64,...); genserve fetches nothing",
                     json_schema_extra={"pattern": "^data:image/[^,]*;base64,"})


class ImagePart(OpenAIBaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class TextPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


Part = Annotated[ImagePart | TextPart, Field(discriminator="type")]


class ModerationRequest(OpenAIBaseModel):
    input: str | list[str] | list[Part] = Field(description="a text, texts, or text and image_url parts; one "
                                                "result per text and per image")
    model: str | None = Field(None, description="a moderation model of GET /v1/models (default: the first one "
                              "the registry lists; OpenAI's omni-/text-moderation-latest name it too)")


class ModerationResultOut(OpenAIBaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[Literal["text", "image"]]]


class ModerationResponse(OpenAIBaseModel):
    id: str
    model: str
    results: list[ModerationResultOut]
