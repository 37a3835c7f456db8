"""Which output gets which mark, what responses say of it, and ``/v1/provenance/verify``."""

from __future__ import annotations

import asyncio

from genserve import __version__
from genserve.app.backends.local_text import LocalTextBackend
from genserve.app.backends.manager import ModelManager
from genserve.app.errors import InvalidRequestError, PayloadTooLargeError, UnavailableError
from genserve.app.provenance.keys import watermark_secret
from genserve.app.registry import ModelEntry
from genserve.app.schemas.provenance import Provenance, VerifyResponse, VerifyTextRequest, WatermarkVerdict
from genserve.app.settings import Settings
from genserve.app.tenancy import check_scope, current_key
from genserve.models.text.sampling import SamplingParams
from genserve.models.text.watermark import SCHEME, Detection, Watermark, detect, key_from_secret

GENERATOR = f"genserve/{__version__}"
MAX_VERIFY_CHARS = 200_000  # about 50k tokens: a long document, scored in well under a second


class ProvenanceService:
    def __init__(self, settings: Settings, manager: ModelManager) -> None:
        self.settings, self.manager = settings, manager
        self._secret: str | None = None

    def start(self) -> None:
        """Reads (or makes) the watermark secret; before the first request."""
        key = self.settings.watermark_key
        self._secret = watermark_secret(key.get_secret_value() if key else None, self.settings.state_dir)

    def watermark(self, model_id: str) -> Watermark:
        """The model's own watermark: its key is the secret's and the model's, so detection names the model."""
        if self._secret is None:
            raise RuntimeError("ProvenanceService.start() was not called")
        return Watermark(key_from_secret(f"{self._secret}\0{model_id}"))

    # text ----------------------------------------------------------------------------------------
    def text(self, entry: ModelEntry, params: SamplingParams) -> Provenance:
        """Sets ``params.watermark`` where the model's output is watermarked, and says what was done."""
        reason = _unmarked_because(entry, params)
        if reason is None:
            params.watermark = self.watermark(entry.id)
        return Provenance(generator=GENERATOR, model=entry.id, watermarked=reason is None,
                          scheme=SCHEME if reason is None else None, reason=reason)

    async def verify_text(self, body: VerifyTextRequest) -> VerifyResponse:
        if len(body.text) > MAX_VERIFY_CHARS:
            raise PayloadTooLargeError(f"text of {len(body.text)} characters; at most {MAX_VERIFY_CHARS} are "
                                       "checked at once (a verdict needs a few hundred words).", param="text")
        checked: list[tuple[str, Detection]] = []
        for b in self._marked_text_models(body.model):
            assert b.tm is not None
            ids, mark = await b.token_ids(body.text), self.watermark(b.entry.id)
            checked.append((b.entry.id, await asyncio.to_thread(detect, ids, mark, b.tm.logits_width)))
        best_id, best = max(checked, key=lambda c: c[1].z_score)
        mark = self.watermark(best_id)
        return VerifyResponse(watermark=WatermarkVerdict(
            detected=best.detected, model=best_id if best.detected else None, scheme=SCHEME, z_score=best.z_score,
            p_value=best.p_value, threshold=mark.z_threshold, tokens_scored=best.tokens_scored,
            green_fraction=best.green_fraction, models_checked=[mid for mid, _ in checked]))

    def _marked_text_models(self, model: str | None) -> list[LocalTextBackend]:
        """The watermarked text models a request may check against: ``model`` alone, or every one its key
        may use."""
        key = current_key()
        marked = {mid: b for mid, b in self.manager.backends.items()
                  if isinstance(b, LocalTextBackend) and b.entry.modality == "text" and b.entry.watermark
                  and (key is None or key.allows(b.entry))}
        if model is not None:
            if (known := self.manager.backends.get(model)) is not None:
                check_scope(known.entry)  # 403 before saying anything else of it
            if model not in marked:
                raise InvalidRequestError(f"'{model}' is not a watermarked text model of this server; those are: "
                                          f"{', '.join(marked) or 'none'}.", param="model")
            marked = {model: marked[model]}
        if not marked:
            raise InvalidRequestError("This server runs no watermarked text model to check against.", param="text")
        loaded = [b for b in marked.values() if b.tm is not None]
        if not loaded:
            raise UnavailableError("The watermarked text models are still loading; try again shortly.")
        return loaded


def _unmarked_because(entry: ModelEntry, params: SamplingParams) -> str | None:
    if entry.backend != "local":
        return "a remote model's output cannot be watermarked by genserve"
    if not entry.watermark:
        return "the watermark is off for this model"
    if params.greedy:
        return "greedy decoding (temperature 0) is not watermarked: a watermark would change its choice"
    return None
