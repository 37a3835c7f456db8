"""Moderation models: the registry's ``modality: moderation`` entries, served by ``POST /v1/moderations``
and usable as a policy's ``guard_model``.

=====================  ==============================================================================
family                 what classifies
=====================  ==============================================================================
``genserve-moderation``  the text tiers of ``moderation.text`` (word lists, hatesonar, phrase rules, the
                       semantic tier of ``moderation.semantic``) and,
                       for images, the CLIP safety checker named by the entry's
                       ``moderation.image_checker`` (without one, images get no category applied)
``llama-guard``        a Llama Guard 3 style model (``moderation.guard``) on a text backend: ``local``
                       (the engine, on the entry's ``source``) or ``remote`` (vLLM's completions API)
=====================  ==============================================================================
"""

from __future__ import annotations

import asyncio

from genserve.app.backends.base import Backend, ModelFacts, ModerationResult
from genserve.app.backends.local_text import LocalTextBackend
from genserve.app.backends.remote import RemoteTextBackend
from genserve.app.metrics import Metrics
from genserve.app.moderation.base import WARM_UP_TEXT, ImageClassifier, TextClassifier, stack_images
from genserve.app.moderation.categories import CATEGORIES, full_scores, merge_scores
from genserve.app.moderation.guard import GuardClassifier
from genserve.app.moderation.policy import DEFAULT_THRESHOLD
from genserve.app.moderation.text import shared_semantic, shared_text_tiers
from genserve.app.registry import ConfigError, ModelEntry
from genserve.models.params import ModerationParams

MODERATION_FAMILIES = ("genserve-moderation", "llama-guard")
IMAGE_CATEGORIES = ("sexual",)  # what the CLIP safety checker judges


def _result(scores: dict[str, float], thresholds: dict[str, float], input_type: str) -> ModerationResult:
    full = full_scores(scores)
    cats = {c: full[c] >= thresholds.get(c, DEFAULT_THRESHOLD) for c in CATEGORIES}
    return ModerationResult(any(cats.values()), cats, full, input_type)  # type: ignore[arg-type]


class TieredModerationBackend(Backend):
    """``genserve-moderation``: OpenAI's moderation endpoint over genserve's own classifiers."""

    def __init__(self, entry: ModelEntry, metrics: Metrics) -> None:
        super().__init__(entry)
        self.tiers: tuple[TextClassifier, ...] = ()
        self.image_checker: ImageClassifier | None = None
        patch = entry.moderation
        self.thresholds: dict[str, float] = {c: t for c, t in ((patch.thresholds or {}) if patch else {}).items()}

    def setup(self) -> None:
        self.tiers = shared_text_tiers()
        for tier in (*self.tiers, shared_semantic()):
            tier.scores(WARM_UP_TEXT)
        path = self.entry.moderation.image_checker if self.entry.moderation else None
        if path is not None:
            from genserve.app.moderation.images import SafetyChecker

            self.image_checker = SafetyChecker.from_dir(path)
        self.loaded = True

    def describe(self) -> ModelFacts:
        applied = {"text": list(CATEGORIES), "image": list(IMAGE_CATEGORIES) if self.image_checker else []}
        return ModelFacts(extra={"category_applied_input_types": applied})

    def applied_input_types(self, category: str) -> list[str]:
        out = ["text"]
        if self.image_checker is not None and category in IMAGE_CATEGORIES:
            out.append("image")
        return out

    async def classify(self, params: ModerationParams) -> list[ModerationResult]:
        return await asyncio.to_thread(self._classify, params)

    def _classify(self, params: ModerationParams) -> list[ModerationResult]:
        semantic = shared_semantic().scores_batch(params.texts)  # one forward pass for an array input
        out = [_result(merge_scores(*(t.scores(text) for t in self.tiers), sem), self.thresholds, "text")
               for text, sem in zip(params.texts, semantic, strict=True)]
        if params.images:
            if self.image_checker is None:
                out += [_result({}, self.thresholds, "image") for _ in params.images]
            else:
                scores = self.image_checker.scores(stack_images(params.images))
                out += [_result(s, self.thresholds, "image") for s in scores]
        return out


class GuardModerationBackend(Backend):
    """``llama-guard``: a guard model answering ``safe`` / ``unsafe\\nS1,...`` on a text backend."""

    def __init__(self, entry: ModelEntry, text: LocalTextBackend | RemoteTextBackend) -> None:
        super().__init__(entry)
        self.text = text
        patch = entry.moderation
        self.thresholds: dict[str, float] = {c: t for c, t in ((patch.thresholds or {}) if patch else {}).items()}

    def setup(self) -> None:
        self.text.setup()
        self.loaded = self.text.loaded

    async def start(self) -> None:
        await self.text.start()

    def ready(self) -> bool:
        return self.loaded and self.text.ready()

    async def check_ready(self) -> bool:
        return self.loaded and await self.text.check_ready()

    def drain(self) -> None:
        self.text.drain()

    async def close(self) -> None:
        await self.text.close()

    def applied_input_types(self, category: str) -> list[str]:
        return ["text"]

    async def classify(self, params: ModerationParams) -> list[ModerationResult]:
        if params.images:
            from genserve.app.errors import InvalidRequestError

            raise InvalidRequestError(f"The moderation model '{self.entry.id}' classifies text only.",
                                      param="input")
        verdicts = await GuardClassifier(self.text).classify(params.texts)
        return [_result(v.scores, self.thresholds, "text") for v in verdicts]


def build_moderation_backend(entry: ModelEntry, metrics: Metrics, timeout_s: float) -> Backend:
    if entry.family == "genserve-moderation":
        if entry.backend != "local":
            raise ConfigError(f"model {entry.id!r}: family 'genserve-moderation' runs in process (backend: local)")
        return TieredModerationBackend(entry, metrics)
    if entry.family == "llama-guard":
        as_text = entry.model_copy(update={"modality": "text", "family": "llama", "tasks": ["completion"]})
        inner = (LocalTextBackend(as_text, metrics) if entry.backend == "local"
                 else RemoteTextBackend(as_text, timeout_s))
        return GuardModerationBackend(entry, inner)
    if entry.backend == "remote":
        raise ConfigError(f"model {entry.id!r}: a remote moderation model needs family 'llama-guard' (a guard "
                          "model on an OpenAI-compatible server such as vLLM)")
    raise ConfigError(f"model {entry.id!r}: moderation models have family "
                      f"{' or '.join(repr(f) for f in MODERATION_FAMILIES)}, not {entry.family!r}")
