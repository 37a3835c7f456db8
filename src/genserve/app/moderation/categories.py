"""OpenAI's moderation categories: every verdict genserve makes is expressed in these 13."""

from __future__ import annotations

from typing import Literal

Category = Literal[
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
    "violence/graphic",
]
CATEGORIES: tuple[Category, ...] = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
    "violence/graphic",
)
# A sub-category implies its parent (OpenAI flags "violence" with "violence/graphic").
PARENT: dict[str, str] = {c: c.split("/")[0] for c in CATEGORIES if "/" in c}


def full_scores(partial: dict[str, float]) -> dict[str, float]:
    """Every category's score (0 where no classifier said anything), parents at least their children's."""
    out: dict[str, float] = {c: 0.0 for c in CATEGORIES}
    for c, s in partial.items():
        if c not in out:
            raise ValueError(f"unknown moderation category {c!r}")
        out[c] = max(out[c], min(1.0, max(0.0, float(s))))
    for child, parent in PARENT.items():
        out[parent] = max(out[parent], out[child])
    return out


def merge_scores(*scores: dict[str, float]) -> dict[str, float]:
    """The highest score per category over several classifiers."""
    out: dict[str, float] = {}
    for s in scores:
        for c, v in s.items():
            out[c] = max(out.get(c, 0.0), v)
    return out
