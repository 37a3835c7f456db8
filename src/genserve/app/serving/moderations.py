"""``/v1/moderations``: the request's texts and images → a moderation model's ``classify`` → OpenAI JSON."""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable

import numpy as np
from fastapi import Request
from PIL import Image, UnidentifiedImageError

from genserve.app.backends.base import ModerationBackend, ModerationResult
from genserve.app.backends.manager import ModelManager
from genserve.app.errors import InvalidRequestError, ModelNotFoundError
from genserve.app.moderation.categories import CATEGORIES
from genserve.app.moderation.service import ModerationService
from genserve.app.schemas.moderations import (
    ImagePart,
    ModerationRequest,
    ModerationResponse,
    ModerationResultOut,
)
from genserve.app.serving.common import response_id
from genserve.models.params import ModerationParams

OPENAI_ALIASES = ("omni-moderation-latest", "text-moderation-latest", "text-moderation-stable")
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_INPUTS = 256


class ModerationServing:
    def __init__(self, manager: ModelManager, moderation: ModerationService) -> None:
        self.manager, self.moderation = manager, moderation

    def default_model(self) -> str:
        for mid, backend in self.manager.backends.items():
            if backend.entry.modality == "moderation":
                return mid
        raise ModelNotFoundError("This server has no moderation model.", param="model")

    async def create(self, body: ModerationRequest, raw: Request) -> ModerationResponse:
        model = body.model if body.model and body.model not in OPENAI_ALIASES else self.default_model()
        backend = await self.manager.acquire(model, "moderation", ModerationBackend)
        params = _params(body)
        results = await backend.classify(params)
        out = [_out(r, backend.applied_input_types) for r in results]
        if isinstance(body.input, list) and body.input and not isinstance(body.input[0], str):
            out = [_combined(out)]  # OpenAI: an array of parts is one input with one result
        return ModerationResponse(id=response_id("modr"), model=model, results=out)


def _out(r: ModerationResult, applied: Callable[[str], list[str]]) -> ModerationResultOut:
    types = {c: [t for t in applied(c) if t == r.input_type] for c in CATEGORIES}
    return ModerationResultOut(flagged=r.flagged, categories=r.categories, category_scores=r.category_scores,
                               category_applied_input_types=types)  # type: ignore[arg-type]


def _combined(parts: list[ModerationResultOut]) -> ModerationResultOut:
    """One result for the parts of one input: the highest score, a category flagged by any part."""
    return ModerationResultOut(
        flagged=any(p.flagged for p in parts),
        categories={c: any(p.categories[c] for p in parts) for c in CATEGORIES},
        category_scores={c: max(p.category_scores[c] for p in parts) for c in CATEGORIES},
        category_applied_input_types={c: sorted({t for p in parts for t in p.category_applied_input_types[c]},
                                                key=("text", "image").index) for c in CATEGORIES})


def _params(body: ModerationRequest) -> ModerationParams:
    inp = body.input
    if isinstance(inp, str):
        return ModerationParams(texts=[inp])
    if len(inp) > MAX_INPUTS:
        raise InvalidRequestError(f"{len(inp)} inputs exceed the limit of {MAX_INPUTS} per request.", param="input")
    params = ModerationParams()
    images: list[tuple[int, ImagePart]] = []
    for i, part in enumerate(inp):
        if isinstance(part, str):
            params.texts.append(part)
        elif isinstance(part, ImagePart):
            images.append((i, part))
        else:
            params.texts.append(part.text)
    params.images = [_decode(part.image_url.url, f"input[{i}].image_url.url") for i, part in images]
    return params


def _decode(url: str, param: str) -> np.ndarray:
    head, sep, data = url.partition(",")
    if not (url.startswith("data:image/") and sep and head.endswith(";base64")):
        raise InvalidRequestError("Give images as data URLs (data:image/png;base64,...); genserve does not fetch "
                                  "URLs.", param=param)
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise InvalidRequestError(f"The image is {im.width}x{im.height}; at most {MAX_IMAGE_PIXELS} "
                                          "pixels.", param=param)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidRequestError(f"The image could not be decoded: {exc}", param=param) from exc
