"""What genserve says of an output's provenance (``provenance`` in responses) and
``POST /v1/provenance/verify``."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field
from pydantic.json_schema import JsonDict

from genserve.app.schemas.base import OpenAIBaseModel


class Provenance(OpenAIBaseModel):
    """genserve's extension on text responses (OpenAI clients ignore it): what marks the output carries."""

    ai_generated: Literal[True] = True
    generator: str = Field(description="genserve and its version")
    model: str
    watermarked: bool = Field(description="whether the output carries genserve's text watermark")
    scheme: str | None = Field(None, description="the watermark's scheme, when watermarked")
    reason: str | None = Field(None, description="why it is not watermarked, when it is not")


VERIFY_EXAMPLE: JsonDict = {"text": "Paste a text of a hundred words or more here."}


class VerifyTextRequest(OpenAIBaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [VERIFY_EXAMPLE]})

    text: str = Field(min_length=1, description="the text to check")
    model: str | None = Field(None, description="check only this text model's watermark (default: every "
                              "watermarked text model this server runs)")


class WatermarkVerdict(OpenAIBaseModel):
    detected: bool
    model: str | None = Field(None, description="the model whose watermark it carries, when detected")
    scheme: str
    z_score: float = Field(description="green tokens above chance, in standard deviations (the best "
                           "model's)")
    p_value: float = Field(description="the chance that text written without the key scores this high")
    threshold: float = Field(description="z-score above which it is detected")
    tokens_scored: int = Field(description="distinct token pairs scored (repeats count once)")
    green_fraction: float
    models_checked: list[str]


class VerifyResponse(OpenAIBaseModel):
    object: Literal["provenance.verification"] = "provenance.verification"
    c2pa: None = Field(None, description="content credentials: texts carry none")
    watermark: WatermarkVerdict
