"""What serving calls: one ``ModerationService`` per app, one resolved ``Policy`` per model.

- ``check_input(model, items, raw)``: the request's texts (each with the parameter it came from); a
  block is a 400 ``content_policy_violation`` naming the parameter, a failed classifier a 503
  ``moderation_unavailable`` (unless the policy fails open).
- ``text_gates(model, raw)``: the output side of text, one ``HoldBack`` per choice, driven by
  ``TextStream.feed``/``finish``.
- ``check_images`` and ``molecule_hit`` / ``check_molecule_query``: the output checks of images and the
  dual-use gate of molecules.

Every check is metered (``genserve_moderation_*``) and every flag written as one JSON line to the
``genserve.moderation.audit`` logger (the text itself only when the policy says ``log_content``).
Classifiers run in a small thread pool with the policy's deadline; they are built once per process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from fastapi import Request
from pydantic import ValidationError

from genserve.app.backends.base import ModerationBackend
from genserve.app.errors import InvalidRequestError, UnavailableError
from genserve.app.metrics import Metrics
from genserve.app.moderation.base import WARM_UP_TEXT, ImageClassifier, TextClassifier, stack_images
from genserve.app.moderation.categories import full_scores, merge_scores
from genserve.app.moderation.gate import HoldBack, Released, Span
from genserve.app.moderation.policy import Policy, PolicyPatch
from genserve.app.moderation.text import TermHalt, TermMatcher, shared_input_tiers, shared_text_tiers, term_matcher
from genserve.app.registry import ConfigError, ModelEntry
from genserve.app.tenancy import current_key
from genserve.models.params import ModerationParams

if TYPE_CHECKING:
    from genserve.app.backends.manager import ModelManager
    from genserve.app.moderation.molecules import DualUseGate, DualUseHit

Direction = Literal["input", "output"]
RELEASE_BATCH = 24  # characters a stream gathers past its hold-back window before the tiers check them
audit = logging.getLogger("genserve.moderation.audit")
log = logging.getLogger(__name__)


class ModerationFailed(RuntimeError):
    """A classifier raised or ran past the policy's deadline."""


@dataclass
class Verdict:
    scores: dict[str, float]
    categories: list[str]  # at or above the policy's thresholds
    term: str | None = None  # the blocked term that matched
    blocked: bool = False  # flagged and the policy blocks
    error: str | None = None  # the check failed (blocked when the policy fails closed)

    @property
    def flagged(self) -> bool:
        return bool(self.categories or self.term)


class ModerationService:
    def __init__(self, policy: Policy, entries: list[ModelEntry], metrics: Metrics,
                 manager: ModelManager | None = None) -> None:
        self.policy = policy
        self.metrics, self.manager = metrics, manager
        self._policies = {e.id: policy.stricter(e.moderation) for e in entries}
        guards = self._guards = {e.id for e in entries if e.modality == "moderation"}
        for i, e in enumerate(entries):
            g = self._policies[e.id].guard_model
            if g is not None and g not in guards:
                raise ConfigError(f"models[{i}] (id {e.id!r}).moderation.guard_model: {g!r} is not a moderation "
                                  f"model of the registry ({', '.join(sorted(guards)) or 'none'})")
        self._molecule_models = {e.id for e in entries if e.modality == "molecule"}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="moderation")
        self._key_policies: dict[tuple[str, str], Policy] = {}
        self._image_checkers: dict[Path, ImageClassifier] = {}

    def check_patch(self, patch: PolicyPatch) -> None:
        """Raises ValueError unless ``patch`` (an API key's ``moderation``) merges with the global policy and
        every model's into a valid policy, so that no request of that key can fail on it."""
        if patch.guard_model is not None and patch.guard_model not in self._guards:
            raise ValueError(f"guard_model {patch.guard_model!r} is not a moderation model of the registry "
                             f"({', '.join(sorted(self._guards)) or 'none'})")
        for model, policy in [("the global policy", self.policy), *self._policies.items()]:
            try:
                policy.stricter(patch)
            except ValidationError as exc:
                raise ValueError(f"merged with {model}'s policy: {exc.errors()[0]['msg']}") from None

    def policy_for(self, model: str) -> Policy:
        """The model's policy, made stricter by the request's API key's ``moderation`` (app/tenancy.py)."""
        policy = self._policies.get(model, self.policy)
        key = current_key()
        if key is None or key.moderation is None:
            return policy
        cache_key = (model, key.moderation.model_dump_json())
        if (keyed := self._key_policies.get(cache_key)) is None:
            if len(self._key_policies) > 4096:
                self._key_policies.clear()
            keyed = self._key_policies[cache_key] = policy.stricter(key.moderation)
        return keyed

    @cached_property
    def tiers(self) -> tuple[TextClassifier, ...]:
        """What checks each release of a stream: the fast tiers (tens of microseconds to a fraction of a
        millisecond)."""
        return shared_text_tiers()

    @cached_property
    def input_tiers(self) -> tuple[TextClassifier, ...]:
        """What checks inputs: the fast tiers and the semantic one (milliseconds; docs/moderation.md)."""
        return shared_input_tiers()

    @cached_property
    def dual_use(self) -> DualUseGate:
        from genserve.app.moderation.molecules import DualUseGate

        return DualUseGate()

    def warm_up(self) -> None:
        """Builds the classifiers before the first request needs them (start-up, in a worker thread, before
        the models load)."""
        if any(p.checks_output for p in self._policies.values()):
            for tier in self.tiers:
                tier.scores(WARM_UP_TEXT)
        # The moderation models' backends (``/v1/moderations``) use the semantic tier too; loaded here, it is
        # built before the model loaders' threads start (app/main.py), not while they import the same libraries.
        if self._guards or any(p.checks_input and p.semantic for p in self._policies.values()):
            for tier in self.input_tiers:
                tier.scores(WARM_UP_TEXT)
        if any(self._policies[m].dual_use for m in self._molecule_models):
            self.dual_use.check("CCO")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # text -------------------------------------------------------------------------------------
    def _matcher(self, policy: Policy) -> TermMatcher:
        return term_matcher(policy.blocked_terms)

    def classify_sync(self, text: str, policy: Policy, direction: Direction = "output") -> Verdict:
        """Every check of ``text`` against ``policy``, in the calling thread: blocked terms, then the tiers."""
        return self._term_verdict(text, policy) or self._tier_verdict(text, policy, direction)

    def _term_verdict(self, text: str, policy: Policy) -> Verdict | None:
        match = self._matcher(policy).find(text)
        if match is None:
            return None
        return Verdict({}, [], match.term, blocked=policy.action == "block")

    def _tier_verdict(self, text: str, policy: Policy, direction: Direction) -> Verdict:
        tiers = self.input_tiers if direction == "input" and policy.semantic else self.tiers
        scores = full_scores(merge_scores(*(t.scores(text) for t in tiers)))
        return self.verdict(scores, policy)

    async def classify(self, text: str, policy: Policy, direction: Direction = "output") -> Verdict:
        """``classify_sync`` with the policy's deadline: blocked terms on the event loop (microseconds, so a
        stream that writes one stops at once), the tiers in the pool. A failure is a Verdict with ``error``
        (blocked when the policy fails closed)."""
        loop = asyncio.get_running_loop()
        try:
            if (v := self._term_verdict(text, policy)) is not None:
                return v
            return await asyncio.wait_for(loop.run_in_executor(self._pool, self._tier_verdict, text, policy,
                                                               direction), policy.timeout_s)
        except Exception as exc:  # a classifier's bug or its deadline: never a reason to let text through
            reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            log.error("moderation check failed: %s", reason)
            return Verdict({}, [], error=reason, blocked=policy.on_error == "fail_closed")

    async def check(self, model: str, direction: Direction, text: str, raw: Request | None,
                    policy: Policy | None = None) -> Verdict:
        """One metered, audited check of ``text``."""
        policy = policy or self.policy_for(model)
        m = self.metrics
        start = time.perf_counter()
        v = await self.classify(text, policy, direction)
        m.moderation_check_seconds.labels(direction).observe(time.perf_counter() - start)
        m.moderation_checks.labels(model, direction).inc()
        if v.error is not None:
            m.moderation_failures.labels(model, direction, policy.on_error).inc()
        elif v.flagged:
            self._record(model, direction, v, policy, text, raw)
        return v

    def term_hit(self, model: str, text: str, raw: Request | None, policy: Policy) -> bool:
        """The policy's blocked terms alone, on the event loop (microseconds): True if ``text`` must stop."""
        v = self._term_verdict(text, policy)
        if v is None:
            return False
        self._record(model, "output", v, policy, text, raw)
        return v.blocked

    def record_halt(self, model: str, policy: Policy, held: str, raw: Request | None) -> None:
        """A blocked term the backend's own check found (``TextStream.halted``); ``held``: the choice's text
        that was never released (the audit log's content, when the policy logs content)."""
        self._record(model, "output", Verdict({}, [], term="(engine)", blocked=True), policy, held, raw)

    def _record(self, model: str, direction: Direction, v: Verdict, policy: Policy, text: str,
                raw: Request | None) -> None:
        action = "blocked" if v.blocked else "flagged"
        for cat in v.categories or ["blocked_term"]:
            self.metrics.moderation_flags.labels(model, direction, cat, action).inc()
        state = raw.scope.get("state", {}) if raw is not None else {}
        line = {"event": "moderation_flag", "request_id": state.get("request_id"), "key_id": state.get("key_id"),
                "model": model, "direction": direction, "action": action, "categories": v.categories,
                "term": v.term is not None,
                "scores": {c: round(s, 4) for c, s in v.scores.items() if s > 0}}
        if policy.log_content:
            line["content"] = text
        audit.info(json.dumps(line, ensure_ascii=False))

    async def check_input(self, model: str, items: list[tuple[str, str]], raw: Request | None) -> None:
        """400 ``content_policy_violation`` naming the first flagged parameter; 503 when a check failed and
        the policy fails closed. ``items``: (parameter, text)."""
        policy = self.policy_for(model)
        if not policy.checks_input or not items:
            return
        verdicts = await asyncio.gather(*(self.check(model, "input", text, raw, policy) for _, text in items))
        for v in verdicts:
            if v.error is not None and v.blocked:
                raise UnavailableError("Moderation is unavailable, and this model's policy refuses what it "
                                       "cannot check; retry shortly.", code="moderation_unavailable",
                                       headers={"Retry-After": "5"})
        for (param, _), v in zip(items, verdicts, strict=True):
            if v.blocked:
                raise content_policy_violation(param, v)
        if policy.guard_model:
            await self._guard_input(model, policy, items, raw)

    async def _guard_input(self, model: str, policy: Policy, items: list[tuple[str, str]],
                           raw: Request | None) -> None:
        """The policy's guard model (a moderation model of the registry) on the inputs, after the tiers."""
        if self.manager is None:
            raise UnavailableError("No guard model is reachable.", code="moderation_unavailable")
        try:
            guard = self.manager.get(policy.guard_model or "", "moderation", ModerationBackend)
            results = await asyncio.wait_for(guard.classify(ModerationParams(texts=[t for _, t in items])),
                                             policy.timeout_s * 4)
        except Exception as exc:
            self.metrics.moderation_failures.labels(model, "input", policy.on_error).inc()
            if policy.on_error == "fail_closed":
                raise UnavailableError(f"The guard model '{policy.guard_model}' failed ({type(exc).__name__}); "
                                       "retry shortly.", code="moderation_unavailable",
                                       headers={"Retry-After": "5"}) from exc
            return
        for (param, text), r in zip(items, results, strict=True):
            v = self.verdict(r.category_scores, policy)
            if v.flagged:
                self._record(model, "input", v, policy, text, raw)
            if v.blocked:
                raise content_policy_violation(param, v)

    @staticmethod
    def verdict(scores: dict[str, float], policy: Policy) -> Verdict:
        """``scores`` (any categories) judged by ``policy``'s thresholds and action."""
        full = full_scores(scores)
        cats = [c for c, s in full.items() if s >= policy.threshold(c)]
        return Verdict(full, cats, blocked=bool(cats) and policy.action == "block")

    def text_stream(self, model: str, raw: Request | None) -> TextStream | None:
        """The output gate of one text call, or None when the model's output is not moderated."""
        policy = self.policy_for(model)
        return TextStream(self, model, policy, raw) if policy.checks_output else None

    # images -----------------------------------------------------------------------------------
    def image_checker(self, policy: Policy) -> ImageClassifier | None:
        if policy.image_checker is None or not policy.checks_output:
            return None
        checker = self._image_checkers.get(policy.image_checker)
        if checker is None:
            from genserve.app.moderation.images import SafetyChecker

            checker = self._image_checkers[policy.image_checker] = SafetyChecker.from_dir(policy.image_checker)
        return checker

    async def check_images(self, model: str, images: list[np.ndarray], raw: Request | None) -> list[Verdict]:
        """The image checker's verdict on each (H, W, 3) uint8 image; empty verdicts without a checker."""
        policy = self.policy_for(model)
        checker = self.image_checker(policy)
        if checker is None or not images:
            return [Verdict({}, []) for _ in images]
        m = self.metrics
        start = time.perf_counter()
        try:
            batch = stack_images(images)
            loop = asyncio.get_running_loop()
            scores = await asyncio.wait_for(loop.run_in_executor(self._pool, checker.scores, batch),
                                            policy.timeout_s * 4)
        except Exception as exc:
            log.error("image moderation failed: %s", exc)
            m.moderation_failures.labels(model, "output", policy.on_error).inc()
            return [Verdict({}, [], error=str(exc), blocked=policy.on_error == "fail_closed") for _ in images]
        m.moderation_check_seconds.labels("output").observe(time.perf_counter() - start)
        out = []
        for s in scores:
            v = self.verdict(s, policy)
            m.moderation_checks.labels(model, "output").inc()
            if v.flagged:
                self._record(model, "output", v, policy, "<image>", raw)
            out.append(v)
        return out

    # molecules --------------------------------------------------------------------------------
    def molecule_hit(self, model: str, smiles: str | None) -> DualUseHit | None:
        """The dual-use gate's hit for a generated molecule (None: it may go out)."""
        if smiles is None or not self.policy_for(model).dual_use:
            return None
        self.metrics.moderation_checks.labels(model, "output").inc()
        hit = self.dual_use.check(smiles)
        if hit is not None:
            self.metrics.moderation_flags.labels(model, "output", "dual_use", "blocked").inc()
            audit.info(json.dumps({"event": "moderation_flag", "model": model, "direction": "output",
                                   "action": "blocked", "categories": ["dual_use"], "agent": hit.agent,
                                   "reason": hit.reason, "similarity": round(hit.similarity, 3)}))
        return hit

    def check_molecule_query(self, model: str, query: str, kind: Literal["similar_to", "substructure"],
                             raw: Request | None, param: str | None = None) -> None:
        """400 ``content_policy_violation`` when a request's molecule (a constraint, an interpolation's end)
        targets a scheduled agent. ``param``: the field (default ``constraints.<kind>``)."""
        policy = self.policy_for(model)
        param = param or f"constraints.{kind}"
        if not policy.dual_use:
            return
        self.metrics.moderation_checks.labels(model, "input").inc()
        hit = self.dual_use.check_query(query, kind)
        if hit is None:
            return
        self.metrics.moderation_flags.labels(model, "input", "dual_use", "blocked").inc()
        state = raw.scope.get("state", {}) if raw is not None else {}
        audit.info(json.dumps({"event": "moderation_flag", "request_id": state.get("request_id"),
                               "key_id": state.get("key_id"), "model": model, "direction": "input",
                               "action": "blocked", "categories": ["dual_use"], "agent": hit.agent}))
        raise InvalidRequestError(f"Your request was rejected by genserve's moderation: {param} targets a "
                                  "chemical weapons agent or precursor (CWC Schedule 1/2).",
                                  param=param, code="content_policy_violation")


def content_policy_violation(param: str, v: Verdict) -> InvalidRequestError:
    what = ", ".join(v.categories) if v.categories else "a blocked term"
    return InvalidRequestError(f"Your request was rejected by genserve's moderation: {param} was flagged "
                               f"({what}).", param=param, code="content_policy_violation")


@dataclass
class _Choice:
    gate: HoldBack
    blocked: bool = False


@dataclass
class TextStream:
    """The output gate of one text call: one hold-back per choice. ``feed`` takes a choice's new text and
    returns what may go out (or None: held, or the choice was blocked: see ``blocked``)."""

    service: ModerationService
    model: str
    policy: Policy
    raw: Request | None
    choices: dict[int, _Choice] = field(default_factory=dict)

    def _choice(self, index: int) -> _Choice:
        c = self.choices.get(index)
        if c is None:
            c = self.choices[index] = _Choice(HoldBack(self.policy.holdback_chars, RELEASE_BATCH))
        return c

    def is_blocked(self, index: int) -> bool:
        c = self.choices.get(index)
        return c is not None and c.blocked

    @property
    def halt(self) -> TermHalt | None:
        """The policy's blocked terms for the engine to check as it writes (``SamplingParams.halt``): a
        sequence stops in the step that writes one. None when there are none or the policy only flags."""
        if not self.policy.blocked_terms or self.policy.action != "block":
            return None
        return TermHalt.for_terms(self.policy.blocked_terms, self.policy.holdback_chars)

    def halted(self, index: int) -> None:
        """The backend stopped this choice on a blocked term (``halt``): nothing more of it goes out. Its
        last text went through ``feed`` first, which flags the same term; a term the engine saw and the
        gate did not (its check windows differ) is blocked and recorded here."""
        c = self._choice(index)
        if not c.blocked:
            c.blocked = True
            self.service.record_halt(self.model, self.policy, c.gate.buf[c.gate.released:], self.raw)

    async def feed(self, index: int, text: str, logprobs: list | None, num_tokens: int) -> Released | None:
        c = self._choice(index)
        if c.blocked:
            return None
        c.gate.push(text, logprobs, num_tokens)
        span = c.gate.pending()
        # Blocked terms on every delta (a stream that writes one stops at once); the classifier tiers once
        # RELEASE_BATCH characters can go out, so a stream pays for them every few tokens, not each one.
        if self.service.term_hit(self.model, span.text, self.raw, self.policy):
            c.blocked = True
            return None
        if span.release_to == c.gate.released:
            return None
        return await self._pass(c, span)

    async def finish(self, index: int) -> Released | None:
        """The choice ended: its whole tail checked; what remains goes out, or None if blocked."""
        c = self._choice(index)
        if c.blocked:
            return None
        return await self._pass(c, c.gate.final())

    async def _pass(self, c: _Choice, span: Span) -> Released | None:
        v = await self.service.check(self.model, "output", span.text, self.raw, self.policy)
        if v.blocked:
            c.blocked = True
            return None
        out = c.gate.release(span)
        m = self.service.metrics
        m.moderation_chars.labels(self.model, "checked").inc(len(out.text))
        return out
