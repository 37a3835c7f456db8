"""Which output gets which mark, what responses say of it, and ``/v1/provenance/verify``."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from typing import cast

import numpy as np
from PIL import Image

from genserve import __version__
from genserve.app.backends.base import Backend, TextBackend
from genserve.app.backends.manager import ModelManager
from genserve.app.errors import InvalidRequestError, PayloadTooLargeError, UnavailableError
from genserve.app.provenance import image_watermark
from genserve.app.provenance.credentials import SIGNABLE, ContentCredentials, UnreadableFile, load_credentials
from genserve.app.provenance.keys import watermark_secret
from genserve.app.registry import ModelEntry
from genserve.app.schemas.provenance import (
    C2paVerdict,
    Provenance,
    VerifyResponse,
    VerifyTextRequest,
    WatermarkVerdict,
)
from genserve.app.settings import Settings
from genserve.app.tenancy import check_scope, current_key
from genserve.models.text.sampling import SamplingParams
from genserve.models.text.watermark import SCHEME, Detection, Watermark, detect, key_from_secret

GENERATOR = f"genserve/{__version__}"
MAX_VERIFY_CHARS = 200_000  # about 50k tokens: a long document (at most 4,096 distinct pairs are scored)
MIN_VERIFY_PAIRS = 50  # distinct token pairs below which a text is not scored
MAX_VERIFY_PIXELS = 4096 * 4096  # an image file's pixels decoded to read its watermark (larger: not read)
IMAGE_CHECKS_AT_ONCE = 2  # image watermark checks at once (each holds a decoded picture, up to 48 MB)
AUDIO_UNMARKED = "genserve has no audio watermark"
REMOTE_FILES = "a remote model's files pass through as its server made them"
SMALL_IMAGE = (f"images under 256x256 pixels (or with a side under {image_watermark.MIN_SIDE}) carry no "
               "watermark: too few blocks to hold it reliably")


class ProvenanceService:
    def __init__(self, settings: Settings, manager: ModelManager) -> None:
        self.settings, self.manager = settings, manager
        self._secret: str | None = None
        self._credentials: ContentCredentials | None = None
        self._image_checks = asyncio.Semaphore(IMAGE_CHECKS_AT_ONCE)

    def start(self) -> None:
        """Reads (or makes) the watermark secret and the C2PA signing credentials; before the first request."""
        s = self.settings
        key = s.watermark_key
        self._secret = watermark_secret(key.get_secret_value() if key else None, s.state_dir)
        self._credentials = ContentCredentials(load_credentials(s.c2pa_cert, s.c2pa_key, s.c2pa_trust_anchors,
                                                                s.state_dir))

    @property
    def credentials(self) -> ContentCredentials:
        if self._credentials is None:
            raise RuntimeError("ProvenanceService.start() was not called")
        return self._credentials

    def watermark(self, model_id: str) -> Watermark:
        """The model's own watermark: its key is the secret's and the model's, so detection names the model."""
        return Watermark(key_from_secret(f"{self._started_secret()}\0{model_id}"))

    # text ----------------------------------------------------------------------------------------
    def text(self, entry: ModelEntry, params: SamplingParams) -> Provenance:
        """Sets ``params.watermark`` where the model's output is watermarked, and says what was done."""
        reason = _unmarked_because(entry, params)
        if reason is None:
            params.watermark = self.watermark(entry.id)
        return Provenance(generator=GENERATOR, model=entry.id, watermarked=reason is None,
                          scheme=SCHEME if reason is None else None, reason=reason)

    # images and audio ----------------------------------------------------------------------------
    def signs(self, entry: ModelEntry, media_type: str, streamed: bool = False) -> bool:
        """Whether ``entry``'s files of ``media_type`` get content credentials: what a local model made
        whole (a remote model's bytes pass through as its server made them; a manifest covers a whole
        file, so audio sent as it is made carries none)."""
        return entry.backend == "local" and entry.c2pa and media_type in SIGNABLE and not streamed

    def mark_file(self, entry: ModelEntry, data: bytes | None, encode: Callable[[], bytes],
                  media_type: str) -> tuple[bytes, bool]:
        """A file made whole: ``data`` as it came (an upstream's bytes), else ``encode()`` signed when
        ``signs`` says so; and whether it was signed (blocking: call it off the event loop)."""
        if data is not None:
            return data, False
        if not self.signs(entry, media_type):
            return encode(), False
        return self.credentials.sign(encode(), media_type, entry.id), True

    def image_watermark(self, entry: ModelEntry, pixels: np.ndarray, exact: bool = False
                        ) -> tuple[np.ndarray, str | None]:
        """``pixels`` watermarked with ``entry``'s payload where that applies (``exact``: the caller's
        pixels must stay as they are, as an inpainting's kept ones), and why not where it does not."""
        if not entry.can_watermark:
            reason = REMOTE_FILES
        elif not entry.watermark:
            reason = "the watermark is off for this model"
        elif exact:
            reason = ("an inpainting keeps the pixels outside its mask exactly as sent, so genserve adds no "
                      "watermark (a mark the upload carried stays)")
        elif not image_watermark.fits(pixels.shape[1], pixels.shape[0]):
            reason = SMALL_IMAGE
        else:
            return image_watermark.embed(pixels, self._image_payload(entry.id)), None
        return pixels, reason

    def _image_payload(self, model_id: str) -> np.ndarray:
        return image_watermark.payload(self._started_secret(), model_id)

    def _started_secret(self) -> str:
        if self._secret is None:
            raise RuntimeError("ProvenanceService.start() was not called")
        return self._secret

    def media(self, entry: ModelEntry, media_type: str, signed: bool, streamed: bool = False,
              unwatermarked: str | None = AUDIO_UNMARKED) -> Provenance:
        """What an image or audio response of ``entry`` carries: ``signed`` says whether its files were,
        ``unwatermarked`` why they carry no watermark (None: they do)."""
        reasons = [] if unwatermarked is None else [unwatermarked]
        if not signed:
            if entry.backend != "local":
                reasons.append(REMOTE_FILES)
            elif not entry.c2pa:
                reasons.append("C2PA content credentials are off for this model")
            elif streamed:
                reasons.append("streamed audio carries no C2PA content credentials: they cover a whole file "
                               "(response_format flac comes whole and signed)")
            else:
                reasons.append(f"{media_type} cannot carry C2PA content credentials")
        return Provenance(generator=GENERATOR, model=entry.id, watermarked=unwatermarked is None,
                          scheme=image_watermark.SCHEME if unwatermarked is None else None, c2pa=signed,
                          reason="; ".join(dict.fromkeys(reasons)) or None)

    @staticmethod
    def headers(provenance: Provenance) -> dict[str, str]:
        """The audio responses' form of ``provenance``."""
        return {"x-genserve-ai-generated": "true", "x-genserve-model": provenance.model,
                "x-genserve-c2pa": str(provenance.c2pa).lower(),
                "x-genserve-watermarked": str(provenance.watermarked).lower()}

    async def verify_file(self, data: bytes) -> VerifyResponse:
        media_type = sniff(data)
        if media_type is None:
            raise InvalidRequestError("The file is not one genserve can check: send PNG, JPEG, WebP, GIF, WAV, "
                                      "FLAC or MP3.", param="file")
        try:
            summary = await asyncio.to_thread(self.credentials.read, data, media_type)
        except UnreadableFile as err:
            raise InvalidRequestError(f"The file could not be read as {media_type}: {err}", param="file") from None
        verdict = None if summary is None else C2paVerdict(
            validation_state=summary.validation_state, model=summary.model, generator=summary.generator,
            digital_source_type=summary.digital_source_type, created=summary.created, issuer=summary.issuer,
            problems=summary.problems, manifest=summary.manifest)
        mark = None
        if media_type.startswith("image/") and (payloads := self._marked_image_payloads()):
            async with self._image_checks:  # each holds a decoded picture: a few at a time
                mark = await asyncio.to_thread(lambda: _image_verdict(_pixels(data), payloads))
        return VerifyResponse(media_type=media_type, c2pa=verdict, watermark=mark)

    def _marked_image_payloads(self) -> dict[str, np.ndarray]:
        """The payloads of the watermarked image models a request's key may use and that make images big
        enough to carry one (a model that never could would only add chances of a false match)."""
        return {mid: self._image_payload(mid) for mid, b in self._marked_backends("image").items()
                if _can_carry(b.describe().sizes)}

    def _marked_backends(self, modality: str) -> dict[str, Backend]:
        """The backends of ``modality`` whose output genserve watermarks and the request's key may use."""
        key = current_key()
        return {mid: b for mid, b in self.manager.backends.items()
                if b.entry.modality == modality and b.entry.can_watermark and b.entry.watermark
                and (key is None or key.allows(b.entry))}

    async def verify_text(self, body: VerifyTextRequest) -> VerifyResponse:
        if len(body.text) > MAX_VERIFY_CHARS:
            raise PayloadTooLargeError(f"text of {len(body.text)} characters; at most {MAX_VERIFY_CHARS} are "
                                       "checked at once (a verdict needs a few hundred words).", param="text")
        checked: list[tuple[str, Detection]] = []
        for b in self._marked_text_models(body.model):
            if (got := await b.token_ids(body.text)) is not None:
                ids, width = got
                checked.append((b.entry.id, await asyncio.to_thread(detect, ids, self.watermark(b.entry.id), width)))
        if not checked:
            raise UnavailableError("The watermarked text models are still loading; try again shortly.")
        best_id, best = max(checked, key=lambda c: c[1].z_score)
        if best.tokens_scored < MIN_VERIFY_PAIRS:
            # A verdict on a few tokens is noise, and one on a single pair would tell its colour: whoever
            # asked pair by pair could map the green lists and strip or forge the mark.
            raise InvalidRequestError(f"The text is too short to check: {best.tokens_scored} distinct token pairs; "
                                      f"at least {MIN_VERIFY_PAIRS} are needed.", param="text")
        mark = self.watermark(best_id)
        return VerifyResponse(media_type="text/plain", watermark=WatermarkVerdict(
            detected=best.detected, model=best_id if best.detected else None, scheme=SCHEME, z_score=best.z_score,
            # the best of several models' keys: the chance that any of them scores this high (Bonferroni)
            p_value=min(1.0, best.p_value * len(checked)), threshold=mark.z_threshold,
            tokens_scored=best.tokens_scored, green_fraction=best.green_fraction,
            models_checked=[mid for mid, _ in checked]))

    def _marked_text_models(self, model: str | None) -> list[TextBackend]:
        """The watermarked text models a request may check against: ``model`` alone, or every one its key
        may use."""
        marked = {mid: cast(TextBackend, b) for mid, b in self._marked_backends("text").items()}
        if model is not None:
            if (known := self.manager.backends.get(model)) is not None:
                check_scope(known.entry)  # 403 before saying anything else of it
            if model not in marked:
                raise InvalidRequestError(f"'{model}' is not a watermarked text model of this server; those are: "
                                          f"{', '.join(marked) or 'none'}.", param="model")
            marked = {model: marked[model]}
        if not marked:
            raise InvalidRequestError("This server runs no watermarked text model to check against.", param="text")
        return list(marked.values())

def _unmarked_because(entry: ModelEntry, params: SamplingParams) -> str | None:
    if not entry.can_watermark:
        return "a remote model's output cannot be watermarked by genserve"
    if not entry.watermark:
        return "the watermark is off for this model"
    if params.greedy:
        return "greedy decoding (temperature 0) is not watermarked: a watermark would change its choice"
    return None


def _pixels(data: bytes) -> np.ndarray | None:
    """An image file's (first) picture as (H, W, 3) uint8, decoded only once its size is known to be within
    ``MAX_VERIFY_PIXELS``; None for a larger one, and where its pixels do not decode (an altered file, whose
    credentials say so)."""
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG", "WEBP", "GIF")) as im:
            if im.width * im.height > MAX_VERIFY_PIXELS:
                return None
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception:
        return None


def _can_carry(sizes: list[tuple[int, int]] | None) -> bool:
    """Whether a model with these sizes makes images that carry the watermark (unknown sizes: perhaps)."""
    return sizes is None or any(image_watermark.fits(w, h) for w, h in sizes)


def _image_verdict(pixels: np.ndarray | None, payloads: dict[str, np.ndarray]) -> WatermarkVerdict | None:
    """Which model's payload ``pixels`` carries, if any (every model's payload and every crop tried are
    counted in the p-value); None for an image too small to carry one, or whose pixels do not decode."""
    if pixels is None or min(pixels.shape[:2]) < image_watermark.MIN_SIDE:
        return None
    found = image_watermark.detect(pixels, payloads)
    return WatermarkVerdict(
        detected=found.model is not None, model=found.model, scheme=image_watermark.SCHEME,
        p_value=found.p_value, threshold=found.threshold, bits_agreeing=found.agreeing,
        bit_accuracy=found.agreeing / image_watermark.BITS, models_checked=list(payloads))


def sniff(data: bytes) -> str | None:
    """A file's media type from its first bytes (what it is, whatever it was called)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] in (b"WEBP", b"WAVE"):
        return "image/webp" if data[8:12] == b"WEBP" else "audio/wav"
    if data.startswith(b"ID3") and len(data) >= 10:  # an ID3v2 tag (C2PA's home in MP3 and FLAC), then the audio
        size = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(data[6:10])) + (10 if data[5] & 0x10 else 0)
        return "audio/flac" if data[size:size + 4] == b"fLaC" else "audio/mpeg"
    if data.startswith(b"fLaC"):
        return "audio/flac"
    if len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:  # an MPEG audio frame
        return "audio/mpeg"
    return None
