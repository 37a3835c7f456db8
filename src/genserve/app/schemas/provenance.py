"""What genserve says of an output's provenance (``provenance`` in responses) and
``POST /v1/provenance/verify``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field
from pydantic.json_schema import JsonDict

from genserve.app.schemas.base import OpenAIBaseModel


class Provenance(OpenAIBaseModel):
    """genserve's extension on text and image responses (OpenAI clients ignore it): what marks the output
    carries. Audio says the same in ``x-genserve-*`` headers."""

    ai_generated: Literal[True] = True
    generator: str = Field(description="genserve and its version")
    model: str
    watermarked: bool = Field(description="whether the output carries genserve's watermark (texts and images; "
                              "reason says why not)")
    scheme: str | None = Field(None, description="the watermark's scheme, when watermarked")
    c2pa: bool = Field(False, description="whether each file carries signed C2PA content credentials")
    reason: str | None = Field(None, description="why a mark is missing, when one is")


VERIFY_EXAMPLE: JsonDict = {"text": "Paste a text of a hundred words or more here."}


class VerifyTextRequest(OpenAIBaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [VERIFY_EXAMPLE]})

    text: str = Field(min_length=1, description="the text to check: long enough to hold 50 distinct pairs of "
                      "consecutive tokens of the model (about 60 words), else a 400 says how many it holds")
    model: str | None = Field(None, description="check only this text model's watermark (default: every "
                              "watermarked text model this server runs)")


class WatermarkVerdict(OpenAIBaseModel):
    detected: bool
    model: str | None = Field(None, description="the model whose watermark it carries, when detected")
    scheme: str
    p_value: float = Field(description="the chance that an output made without the key scores this high")
    threshold: float = Field(description="texts: the z-score above which the watermark is detected; images: the "
                             "agreeing bits (of 64) from which it is")
    models_checked: list[str]
    z_score: float | None = Field(None, description="texts: green tokens above chance, in standard deviations "
                                  "(the best model's)")
    tokens_scored: int | None = Field(None, description="texts: distinct token pairs scored (repeats count once)")
    green_fraction: float | None = Field(None, description="texts: the share of green tokens")
    bits_agreeing: int | None = Field(None, description="images: bits of the 64 read that match the best model's "
                                      "payload")
    bit_accuracy: float | None = Field(None, description="images: bits_agreeing / 64")


class C2paVerdict(OpenAIBaseModel):
    validation_state: str = Field(
        description="Invalid: the file or manifest was altered, or the signature fails; Valid: intact, signer "
        "not trusted here; Trusted: intact and signed by a certificate this server trusts")
    model: str | None = Field(None, description="the model the manifest says made it")
    generator: str | None = None
    digital_source_type: str | None = None
    created: str | None = None
    issuer: str | None = Field(None, description="the signing certificate's organisation")
    problems: list[str] = Field(default_factory=list, description="c2pa's failure codes")
    manifest: dict[str, Any] = Field(default_factory=dict, description="the active manifest, as c2pa reads it")


class VerifyResponse(OpenAIBaseModel):
    object: Literal["provenance.verification"] = "provenance.verification"
    media_type: str = Field(description="text/plain, or the file's type as its bytes say")
    c2pa: C2paVerdict | None = Field(None, description="the file's content credentials; null when it carries "
                                     "none (texts never do)")
    watermark: WatermarkVerdict | None = Field(None, description="the watermark's verdict: texts, and images of "
                                               "64x64 pixels or more while a watermarked image model runs; null "
                                               "for audio (genserve has no audio watermark)")
