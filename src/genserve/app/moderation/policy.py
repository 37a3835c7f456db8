"""Moderation policies: decided on the server, never by a request.

A ``Policy`` is complete; the global one comes from settings (``GENSERVE_MODERATION``, JSON). A registry
entry's ``moderation:`` block and, later, an API key's are ``PolicyPatch``es: only the fields they set
count, and ``Policy.stricter`` merges them so that the most restrictive value of each field wins
(moderation on beats off, ``block`` beats ``flag``, the lower threshold, the union of blocked terms, the
longer hold-back window, ``fail_closed`` beats ``fail_open``). So a model or a key can tighten the
global policy and never loosen it; to serve a model unmoderated the operator turns the global policy
off and turns it on for the other models.

Default: on for every model, input and output, block, every category at 0.5 (``DEFAULT_THRESHOLD``),
a 48-character hold-back window, fail closed, the dual-use gate on for molecules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from genserve.app.moderation.categories import CATEGORIES, Category

DEFAULT_THRESHOLD = 0.5
Action = Literal["block", "flag"]
OnError = Literal["fail_closed", "fail_open"]


def _check_thresholds(value: dict[str, float] | None) -> dict[str, float] | None:
    for cat, t in (value or {}).items():
        if cat not in CATEGORIES:
            raise ValueError(f"unknown category {cat!r}; categories: {', '.join(CATEGORIES)}")
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"threshold of {cat!r} must be in [0, 1], not {t}")
    return value


def _check_terms(value: list[str] | None) -> list[str] | None:
    from genserve.app.moderation.text import TermMatcher  # compiles each regex; names a bad one

    TermMatcher(value or [])
    return value


class PolicyPatch(BaseModel):
    """A registry entry's (or key's) ``moderation:`` block: only what it sets counts, and only where it
    is stricter than what it is merged with."""

    model_config = ConfigDict(extra="forbid")
    input: bool | None = Field(None, description="check what the caller sends (prompts, messages, speech "
                               "input, molecule constraints)")
    output: bool | None = Field(None, description="check what the model makes before any byte of it is sent")
    action: Action | None = Field(None, description="block: refuse or cut off; flag: count and log only")
    thresholds: dict[Category, float] | None = Field(None, description="score at or above which a category "
                                                     "is flagged (default 0.5 each)")
    blocked_terms: list[str] | None = Field(None, description="phrases (or 're:REGEX') blocked after NFKC, "
                                            "case and leetspeak normalisation")
    holdback_chars: int | None = Field(None, ge=1, le=4096, description="streams: characters held back until "
                                       "the text after them has been checked")
    on_error: OnError | None = Field(None, description="a classifier that fails or times out: fail_closed "
                                     "(503, or content_filter mid-stream) or fail_open")
    timeout_s: float | None = Field(None, gt=0, le=60, description="longest one check may take")
    image_checker: Path | None = Field(None, description="directory of a CLIP safety checker for image outputs")
    guard_model: str | None = Field(None, description="id of a moderation model (e.g. a Llama Guard) that "
                                    "checks inputs too")
    dual_use: bool | None = Field(None, description="molecules: withhold and refuse CWC-scheduled agents")
    semantic: bool | None = Field(None, description="run the semantic tier (a sentence encoder, milliseconds a "
                                  "text on a CPU) on inputs")
    log_content: bool | None = Field(None, description="put the flagged text in the audit log line")

    _thresholds = field_validator("thresholds")(classmethod(lambda cls, v: _check_thresholds(v)))
    _terms = field_validator("blocked_terms")(classmethod(lambda cls, v: _check_terms(v)))

    @field_validator("image_checker")
    @classmethod
    def _dir_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"directory not found: {value}")
        return value


class Policy(BaseModel):
    """A complete policy: the global one, or the result of merging patches into it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = Field(True, description="off: no checks at all, unless a model's block turns them on")
    input: bool = True
    output: bool = True
    action: Action = "block"
    thresholds: dict[Category, float] = Field(default_factory=dict)
    blocked_terms: tuple[str, ...] = ()
    holdback_chars: int = Field(48, ge=1, le=4096)
    on_error: OnError = "fail_closed"
    timeout_s: float = Field(10.0, gt=0, le=60)
    image_checker: Path | None = None
    guard_model: str | None = None
    dual_use: bool = True
    semantic: bool = True
    log_content: bool = False

    _thresholds = field_validator("thresholds")(classmethod(lambda cls, v: _check_thresholds(v)))
    @field_validator("blocked_terms")
    @classmethod
    def _terms_tuple(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        _check_terms(list(value))
        return tuple(value)

    @model_validator(mode="after")
    def _window_holds_terms(self) -> Policy:
        from genserve.app.moderation.text import TermMatcher

        longest = TermMatcher(list(self.blocked_terms)).max_literal_len
        if longest > self.holdback_chars:
            raise ValueError(f"holdback_chars ({self.holdback_chars}) must be at least the longest blocked term "
                             f"({longest} characters), or a stream could release its first characters")
        return self

    def threshold(self, category: str) -> float:
        return self.thresholds.get(category, DEFAULT_THRESHOLD)  # type: ignore[call-overload]

    def stricter(self, patch: PolicyPatch | None) -> Policy:
        """This policy with ``patch`` merged in, the most restrictive value of each field winning. With the
        global policy off, a patch that sets anything is its model's whole policy (unset fields at their
        defaults)."""
        if patch is None:
            return self
        p = patch.model_dump(exclude_none=True)
        if not p:
            return self
        if not self.enabled:
            p["blocked_terms"] = tuple(p.get("blocked_terms", ()))
            return Policy.model_validate(p)
        base = self
        thresholds = dict(base.thresholds)
        for cat, t in (patch.thresholds or {}).items():
            thresholds[cat] = min(t, base.threshold(cat))
        merged = base.model_copy(update={
            "input": base.input or bool(patch.input),
            "output": base.output or bool(patch.output),
            "action": "block" if "block" in (base.action, patch.action) else "flag",
            "thresholds": thresholds,
            "blocked_terms": tuple(dict.fromkeys([*base.blocked_terms, *(patch.blocked_terms or [])])),
            "holdback_chars": max(base.holdback_chars, patch.holdback_chars or 0),
            "on_error": "fail_closed" if "fail_closed" in (base.on_error, patch.on_error) else "fail_open",
            "timeout_s": min(base.timeout_s, patch.timeout_s or base.timeout_s),
            "image_checker": patch.image_checker or base.image_checker,
            "guard_model": patch.guard_model or base.guard_model,
            "dual_use": base.dual_use or bool(patch.dual_use),
            "semantic": base.semantic or bool(patch.semantic),
            "log_content": base.log_content or bool(patch.log_content),
        })
        return Policy.model_validate(merged.model_dump())

    @property
    def checks_input(self) -> bool:
        return self.enabled and self.input

    @property
    def checks_output(self) -> bool:
        return self.enabled and self.output
