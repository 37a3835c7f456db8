"""Images: generation, edits (inpainting and image-to-image) and latent interpolation, answered as OpenAI's images
response (PNG in base64, or a short-lived URL on this server).

Everything a request can get wrong is checked before any model work: the model's kind, the size
against the model's list, ``n``, pixels and steps against its limits, and for uploads their bytes
and pixel count before a single pixel is decoded.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import io
import json
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator
from typing import Any

import numpy as np
from fastapi import Request, UploadFile
from fastapi.responses import Response
from PIL import Image

from genserve.app.backends.base import ImageArtifact, ImageBackend, ImageEvent, ModelFacts, Progress
from genserve.app.backends.manager import ModelManager
from genserve.app.errors import GenserveError, InvalidRequestError, NotFoundError, PayloadTooLargeError
from genserve.app.metrics import Metrics
from genserve.app.moderation.service import ModerationService
from genserve.app.provenance.service import REMOTE_FILES, ProvenanceService
from genserve.app.schemas.images import (
    IMAGE_TO_IMAGE_STRENGTH,
    DiffusionKnobs,
    ImageData,
    ImageEditForm,
    ImageGenerationRequest,
    ImageInterpolationRequest,
    ImagesResponse,
    OutputFields,
)
from genserve.app.schemas.provenance import Provenance
from genserve.app.serving.common import Deadline, event_stream, now, seed_or_random, unless_disconnected
from genserve.app.serving.media import artifact_pixels, image_bytes
from genserve.app.settings import Settings
from genserve.app.tenancy import note_usage
from genserve.models.params import ImageInterpolationParams, ImageJob, ImageParams
from genserve.models.seeding import item_seed

FILES_PATH = "/v1/images/files"


UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")  # what image edits accept (docs: README's Images)


class ImageStore:
    """PNG and GIF bytes behind unguessable ids, for ``response_format: url``; each expires after
    ``ttl_s``, and the oldest go first once ``max_bytes`` are held, counting what each entry costs
    beside its bytes (``ITEM_OVERHEAD``: its id, tuple and dict slot), or ``max_items`` are."""

    ITEM_OVERHEAD = 300  # bytes: 267 measured with tracemalloc on CPython 3.11, rounded up

    def __init__(self, ttl_s: float, max_bytes: int, max_items: int = 100_000) -> None:
        self.ttl_s, self.max_bytes, self.max_items = ttl_s, max_bytes, max_items
        self._items: OrderedDict[str, tuple[bytes, str, float]] = OrderedDict()
        self._bytes = 0

    def put(self, data: bytes, media_type: str) -> str:
        self._expire()
        cost = len(data) + self.ITEM_OVERHEAD
        while self._items and (self._bytes + cost > self.max_bytes or len(self._items) >= self.max_items):
            self._drop(next(iter(self._items)))
        key = uuid.uuid4().hex + uuid.uuid4().hex
        self._items[key] = (data, media_type, time.monotonic() + self.ttl_s)
        self._bytes += cost
        return key

    def get(self, key: str) -> tuple[bytes, str] | None:
        self._expire()
        item = self._items.get(key)
        return (item[0], item[1]) if item else None

    def _expire(self) -> None:
        t = time.monotonic()  # one TTL for all: the oldest item expires first
        while self._items and next(iter(self._items.values()))[2] <= t:
            self._drop(next(iter(self._items)))

    def _drop(self, key: str) -> None:
        data, _, _ = self._items.pop(key)
        self._bytes -= len(data) + self.ITEM_OVERHEAD


class ImageServing:
    def __init__(self, manager: ModelManager, metrics: Metrics, settings: Settings,
                 moderation: ModerationService, provenance: ProvenanceService) -> None:
        self.manager, self.metrics, self.settings, self.moderation = manager, metrics, settings, moderation
        self.provenance = provenance
        self.store = ImageStore(settings.image_url_ttl_s, settings.image_store_bytes)

    # checks ------------------------------------------------------------------------------------
    @staticmethod
    def _size(backend: ImageBackend, facts: ModelFacts, size: str | None) -> tuple[int, int]:
        """The (width, height) asked for; (0, 0) for ``auto`` where the model's native size is unknown
        (a remote backend forwards ``size`` as given)."""
        if size in (None, "auto"):
            return facts.native_size or (0, 0)
        w, h = (int(v) for v in size.split("x"))
        if facts.sizes is not None and (w, h) not in facts.sizes:
            raise InvalidRequestError(f"size {size} is not supported by '{backend.entry.id}'; supported: "
                                      f"{', '.join(f'{a}x{b}' for a, b in facts.sizes)}.", param="size")
        if w * h > backend.entry.limits.max_image_pixels:
            raise InvalidRequestError(f"size {size} exceeds this model's limit of "
                                      f"{backend.entry.limits.max_image_pixels} pixels.", param="size")
        return w, h

    @staticmethod
    def _check_output(backend: ImageBackend, output: OutputFields) -> None:
        if output.output_format != "png" and backend.entry.backend == "remote":
            raise InvalidRequestError(f"output_format applies to this server's own models; '{backend.entry.id}' "
                                      "returns its upstream's images as they come.", param="output_format")
        if output.output_compression is not None and output.output_format == "png":
            raise InvalidRequestError("output_compression applies to jpeg and webp.", param="output_compression")

    def _jobs(self, backend: ImageBackend, facts: ModelFacts, body: DiffusionKnobs, prompt: str, n: int,
              size: str | None) -> list[ImageJob]:
        limits = backend.entry.limits
        if n > limits.max_n:
            raise InvalidRequestError(f"n={n} exceeds this model's limit of {limits.max_n}.", param="n")
        if body.num_inference_steps is not None and body.num_inference_steps > limits.max_steps:
            raise InvalidRequestError(f"num_inference_steps={body.num_inference_steps} exceeds this model's "
                                      f"limit of {limits.max_steps}.", param="num_inference_steps")
        width, height = self._size(backend, facts, size)
        if facts.image_kind == "latent":
            for knob in ("num_inference_steps", "guidance_scale", "scheduler", "negative_prompt"):
                if getattr(body, knob) is not None:
                    raise InvalidRequestError(f"{knob} applies to diffusion models; '{backend.entry.id}' makes "
                                              "an image in one pass.", param=knob)
        seed = seed_or_random(body.seed)
        return [ImageJob(prompt=prompt, seed=item_seed(seed, k), width=width, height=height,
                         negative_prompt=body.negative_prompt, steps=body.num_inference_steps,
                         guidance_scale=body.guidance_scale, scheduler=body.scheduler)
                for k in range(n)]

    def _data(self, raw: Request, images: list[bytes], media_type: str, fmt: str,
              seeds: list[int | None]) -> list[ImageData]:
        if fmt == "b64_json":
            return [ImageData(b64_json=base64.b64encode(b).decode(), seed=s)
                    for b, s in zip(images, seeds, strict=True)]
        base = self.settings.base_url()  # never the request's Host
        return [ImageData(url=f"{base}{FILES_PATH}/{self.store.put(b, media_type)}", seed=s)
                for b, s in zip(images, seeds, strict=True)]

    async def _respond(self, raw: Request, model: str, artifacts: list[ImageArtifact], fmt: str,
                       output: OutputFields | None = None, exact: bool = False) -> ImagesResponse:
        """The response of ``artifacts``: marked and encoded (``_encode``), then stored or inlined."""
        files = await self._encode(model, artifacts, output, exact)
        return ImagesResponse(created=now(), data=self._data(raw, files.data, files.media_type, fmt, files.seeds),
                              provenance=files.provenance)

    async def _encode(self, model: str, artifacts: list[ImageArtifact], output: OutputFields | None,
                      exact: bool) -> _Files:
        """``artifacts`` as files: watermarked (``exact``: an inpainting, whose kept pixels are the
        caller's and stay so), encoded in the format asked for, and signed; counted as made."""
        made = sum(1 if a.frames is None else len(a.frames) for a in artifacts)
        self.metrics.images.labels(model).inc(made)
        note_usage("image", made)
        entry = self.manager.backends[model].entry
        quality = None
        if output is not None and output.output_format != "png":  # pixels made here, in the format asked for
            quality = output.output_compression
            artifacts = [dataclasses.replace(a, media_type=f"image/{output.output_format}")
                         if a.encoded is None and a.frames is None else a for a in artifacts]
        media = artifacts[0].media_type if artifacts else "image/png"

        def mark(a: ImageArtifact) -> tuple[bytes, bool, str | None]:
            """The marks of what was made here, the watermark in its pixels and then content credentials
            as it is encoded; an upstream's bytes pass as they came."""
            if a.pixels is not None:
                pixels, unmarked = self.provenance.image_watermark(entry, a.pixels, exact)
                a = dataclasses.replace(a, pixels=pixels)
            elif a.frames is not None:
                unmarked = "an animation (GIF) carries no watermark"
            else:
                unmarked = REMOTE_FILES
            data, signed = self.provenance.mark_file(entry, a.encoded, functools.partial(image_bytes, a, quality),
                                                     a.media_type)
            return data, signed, unmarked

        marked = await asyncio.to_thread(lambda: [mark(a) for a in artifacts])
        encoded = [data for data, _, _ in marked]
        signed = bool(marked) and all(s for _, s, _ in marked)
        unwatermarked = next((why for _, _, why in marked if why is not None), None) if marked else "no image"
        return _Files(encoded, media, [a.seed for a in artifacts],
                      self.provenance.media(entry, media, signed, unwatermarked=unwatermarked))

    async def _checked(self, model: str, raw: Request, events: AsyncGenerator[ImageEvent]
                       ) -> AsyncGenerator[ImageEvent]:
        """The one point every event of a backend passes before any PNG, GIF, JSON or SSE is made of
        it: output moderation (the policy's image checker, when it names one); provenance marks come
        as it is encoded (``_respond``). A flagged image blocks the whole response (OpenAI's
        ``content_policy_violation``): no byte of it is encoded."""
        try:
            async for event in events:
                if isinstance(event, ImageArtifact):
                    await self._check_artifact(model, raw, event)
                yield event
        finally:
            await events.aclose()

    async def _check_artifact(self, model: str, raw: Request, artifact: ImageArtifact) -> None:
        if self.moderation.image_checker(self.moderation.policy_for(model)) is None:
            return
        frames = await asyncio.to_thread(artifact_pixels, artifact)
        for v in await self.moderation.check_images(model, frames, raw):
            if v.blocked:
                what = ", ".join(v.categories) or "a failed check"
                raise InvalidRequestError(f"Your request was rejected by genserve's moderation: a generated image "
                                          f"was flagged ({what}).", param="prompt", code="content_policy_violation")

    async def _artifacts(self, backend: ImageBackend, raw: Request, events: AsyncGenerator[ImageEvent]
                         ) -> list[ImageArtifact]:
        deadline = Deadline.start(backend.entry.timeout_s(self.settings.request_timeout_s), self.manager)
        checked = self._checked(backend.entry.id, raw, events)
        return [e async for e in deadline.stream(checked) if isinstance(e, ImageArtifact)]

    # generation -------------------------------------------------------------------------------
    async def generate(self, body: ImageGenerationRequest, raw: Request) -> Any:
        backend = await self.manager.acquire(body.model, "generation", ImageBackend)
        facts = backend.describe()
        jobs = self._jobs(backend, facts, body, body.prompt, body.n, body.size)
        self._check_output(backend, body)
        if body.stream and facts.image_kind == "latent":
            raise InvalidRequestError("stream applies to diffusion models.", param="stream")
        if body.partial_images:
            raise InvalidRequestError("partial_images is not supported: genserve checks and marks each finished "
                                      "image before it leaves, and a partial image would leave unchecked and "
                                      "unmarked; with stream_progress: true its streams send an "
                                      "image_generation.progress event for each denoising step instead.",
                                      param="partial_images")
        await self.moderation.check_input(body.model, [("prompt", body.prompt)], raw)
        params = ImageParams(jobs=jobs, size=body.size, stream=body.stream)
        if body.stream:
            # The first event is awaited before any header goes out, so an error that comes first (a
            # full queue, an upstream's 400) is still an HTTP error, as for text.
            deadline = Deadline.start(backend.entry.timeout_s(self.settings.request_timeout_s), self.manager)
            events = deadline.stream(self._checked(body.model, raw, backend.generate(params)))
            try:
                first = await anext(events)
            except StopAsyncIteration:
                first = None
            size = f"{jobs[0].width}x{jobs[0].height}" if jobs[0].width else body.size or "auto"
            return event_stream(self._stream(first, events, body, size, raw), self.settings.shutdown_grace_s)

        async def run() -> ImagesResponse:
            artifacts = await self._artifacts(backend, raw, backend.generate(params))
            return await self._respond(raw, body.model, artifacts, body.response_format, body)

        return await unless_disconnected(raw, run())

    async def _stream(self, first: ImageEvent | None, events: AsyncGenerator[ImageEvent, None],
                      body: ImageGenerationRequest, size: str, raw: Request) -> AsyncGenerator[str, None]:
        """OpenAI's ``image_generation.completed`` for each image (``b64_json`` always; ``url`` too when
        asked), after genserve's ``image_generation.progress`` for each denoising step if the caller asked
        for them (``stream_progress``)."""
        artifacts: list[ImageArtifact] = []
        try:
            pending = [first] if first is not None else []
            async for event in _chain(pending, events):
                if isinstance(event, Progress):
                    if body.stream_progress:
                        yield json.dumps({"type": "image_generation.progress", "step": event.step,
                                          "total_steps": event.total})
                else:
                    artifacts.append(event)
            files = await self._encode(body.model, artifacts, body, exact=False)
            created = now()
            urls = (self._data(raw, files.data, files.media_type, "url", files.seeds)
                    if body.response_format == "url" else None)
            for k, data in enumerate(files.data):
                yield json.dumps({
                    "type": "image_generation.completed", "b64_json": base64.b64encode(data).decode(),
                    "created_at": created, "size": size, "quality": "auto", "background": "opaque",
                    "output_format": files.media_type.removeprefix("image/"), "usage": NO_USAGE,
                    "seed": files.seeds[k], **({"url": urls[k].url} if urls else {}),
                    "provenance": files.provenance.model_dump()})
        except GenserveError as err:  # after the headers: the error travels as an event
            yield json.dumps(err.body())
        finally:
            await events.aclose()
        yield "[DONE]"

    # edits ------------------------------------------------------------------------------------
    async def edit(self, form: ImageEditForm, image: UploadFile, mask: UploadFile | None, raw: Request) -> Any:
        """Inpainting where the mask (or, without one, the image's own alpha) is transparent; with
        neither a mask nor transparent pixels, image-to-image of the whole picture."""
        backend = await self.manager.acquire(form.model, "edit", ImageBackend)
        facts = backend.describe()
        if facts.can_inpaint is False and facts.can_vary is False:  # None: the backend will say
            raise InvalidRequestError(f"The model '{form.model}' has no image-to-image or inpainting pipeline.",
                                      param="model", code="model_not_supported")
        jobs = self._jobs(backend, facts, form, form.prompt, form.n, form.size)
        self._check_output(backend, form)
        await self.moderation.check_input(form.model, [("prompt", form.prompt)], raw)
        limits = backend.entry.limits
        picture, upload = await self._read_upload(image, "image", limits.max_upload_bytes, limits.max_upload_pixels)
        alpha_from, upload_mask = picture, None
        if mask is not None:
            alpha_from, upload_mask = await self._read_upload(mask, "mask", limits.max_upload_bytes,
                                                              limits.max_upload_pixels)
        if mask is not None and alpha_from.size != picture.size:
            raise InvalidRequestError(f"mask is {alpha_from.size[0]}x{alpha_from.size[1]} but image is "
                                      f"{picture.size[0]}x{picture.size[1]}; they must match.", param="mask")
        out = (jobs[0].width, jobs[0].height)
        (pw, ph), (ow, oh) = picture.size, out
        if ow and oh and pw * oh != ph * ow:  # never stretched: the caller crops or pads, knowing how
            raise InvalidRequestError(f"image is {pw}x{ph} but the output is {ow}x{oh}: genserve neither crops nor "
                                      f"stretches, so the image must have the output's aspect ratio "
                                      f"({ow // math.gcd(ow, oh)}:{oh // math.gcd(ow, oh)}); crop or pad it, or "
                                      "ask for a size of its shape.", param="image")
        native = facts.native_size if facts.edit_at_native_size and facts.native_size else out
        native = native if all(native) else picture.size  # a remote model's sizes are its upstream's to check
        rgb = np.asarray(picture.convert("RGB").resize(native, Image.Resampling.LANCZOS))
        hole = None
        if "A" in alpha_from.getbands():
            hole = np.asarray(alpha_from.getchannel("A").resize(native, Image.Resampling.NEAREST)) < 128
            hole = hole if hole.any() else None
        if mask is not None and hole is None:
            raise InvalidRequestError("mask has no transparent pixels, so nothing would be repainted; leave the "
                                      "mask out to redo the whole image (image-to-image).", param="mask")
        if hole is not None and facts.can_inpaint is False:
            raise InvalidRequestError(f"The model '{form.model}' has no inpainting pipeline; send an opaque image "
                                      "without a mask for image-to-image.", param="mask", code="model_not_supported")
        if hole is None and facts.can_vary is False:
            raise InvalidRequestError(f"The model '{form.model}' has no image-to-image pipeline: send a mask (or "
                                      "transparent pixels) to inpaint.", param="image", code="model_not_supported")
        for job in jobs:
            job.image, job.strength = rgb, form.strength
            job.mask = hole.astype(np.float32) if hole is not None else None
            if hole is None and job.strength is None:
                job.strength = IMAGE_TO_IMAGE_STRENGTH
        params = ImageParams(jobs=jobs, size=form.size, upload=upload, upload_mask=upload_mask)

        async def run() -> ImagesResponse:
            artifacts = await self._artifacts(backend, raw, backend.generate(params))
            if hole is not None and all(out):
                artifacts = await asyncio.to_thread(_keep_unmasked, artifacts, picture, alpha_from, out)
            return await self._respond(raw, form.model, artifacts, form.response_format, form, exact=hole is not None)

        return await unless_disconnected(raw, run())

    @staticmethod
    async def _read_upload(upload: UploadFile, param: str, max_bytes: int, max_pixels: int
                           ) -> tuple[Image.Image, bytes]:
        """The uploaded picture, decoded only once its byte and pixel counts are within the limits, and
        its bytes as uploaded."""
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise PayloadTooLargeError(f"{param} is larger than this model's limit of {max_bytes} bytes.")
        try:  # the header only, and only of the formats documented: no other decoder sees the bytes
            picture = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
        except Exception:
            raise InvalidRequestError(f"{param} is not a PNG, JPEG or WebP image.", param=param) from None
        w, h = picture.size
        if w * h > max_pixels:
            raise InvalidRequestError(f"{param} is {w}x{h}; this model accepts at most {max_pixels} pixels.",
                                      param=param)
        try:
            picture.load()
        except Exception:
            raise InvalidRequestError(f"{param} could not be decoded.", param=param) from None
        return picture, data

    # interpolation ----------------------------------------------------------------------------
    async def interpolate(self, body: ImageInterpolationRequest, raw: Request) -> Any:
        backend = await self.manager.acquire(body.model, "interpolation", ImageBackend)
        if body.class_:
            await self.moderation.check_input(body.model, [("class", body.class_)], raw)
        width, height = self._size(backend, backend.describe(), body.size)
        params = ImageInterpolationParams(seed_start=body.seed_start, seed_end=body.seed_end, frames=body.frames,
                                          method=body.method, class_name=body.class_, format=body.format,
                                          width=width, height=height, size=body.size)

        async def run() -> ImagesResponse:
            artifacts = await self._artifacts(backend, raw, backend.interpolate(params))
            return await self._respond(raw, body.model, artifacts, body.response_format)

        return await unless_disconnected(raw, run())

    # files ------------------------------------------------------------------------------------
    def file(self, key: str) -> Response:
        item = self.store.get(key)
        if item is None:
            raise NotFoundError("This image does not exist or has expired.")
        data, media_type = item
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=60"})


@dataclasses.dataclass
class _Files:
    """A response's images as files, and what marks they carry."""

    data: list[bytes]
    media_type: str
    seeds: list[int | None]
    provenance: Provenance


# OpenAI's completed event requires usage, which it counts in tokens for its GPT image models only;
# genserve's image models are not priced in tokens, so every count is 0.
NO_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
            "total_tokens": 0}


def _keep_unmasked(artifacts: list[ImageArtifact], picture: Image.Image, alpha_from: Image.Image,
                   size: tuple[int, int]) -> list[ImageArtifact]:
    """Inpainting at the output's resolution: every pixel the mask keeps is the caller's own (the
    picture at the output size), however the model made the rest (at its native size, then scaled)."""
    keep = np.asarray(alpha_from.getchannel("A").resize(size, Image.Resampling.NEAREST)) >= 128
    original = np.asarray(picture.convert("RGB").resize(size, Image.Resampling.LANCZOS))
    return [dataclasses.replace(a, pixels=np.where(keep[..., None], original, a.pixels))
            if a.pixels is not None and a.pixels.shape[:2] == keep.shape else a for a in artifacts]


async def _chain(first: list[ImageEvent], rest: AsyncGenerator[ImageEvent, None]
                 ) -> AsyncGenerator[ImageEvent, None]:
    """``first``'s events, then ``rest``'s."""
    for item in first:
        yield item
    async for item in rest:
        yield item
