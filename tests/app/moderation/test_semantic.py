"""The semantic tier: offline, its score crossing 0.5 exactly at its documented bar, threats and
self-harm intent said in new words above benign look-alikes."""

from __future__ import annotations

import pytest

from genserve.app.moderation.semantic import FLOOR, MARGIN, SemanticClassifier


@pytest.fixture(scope="module")
def tier() -> SemanticClassifier:
    return SemanticClassifier()


def test_score_crosses_half_at_the_bar(tier: SemanticClassifier) -> None:
    for text in ("I will find you and you will regret being born.", "Please pass the salt.", ""):
        scores = tier.scores(text)
        if not text:
            assert scores == {}
            continue
        sims, benign = tier.similarities(text)
        for cat, s in sims.items():
            assert (scores[cat] >= 0.5) == (s >= max(benign + MARGIN, FLOOR))


@pytest.mark.parametrize(("text", "category"), [
    ("Meet me behind the school, you're going to need an ambulance.", "harassment/threatening"),
    ("I've given away my things and tonight I'll finally be at peace, for good.", "self-harm/intent"),
])
def test_paraphrases_are_flagged(tier: SemanticClassifier, text: str, category: str) -> None:
    assert tier.scores(text)[category] >= 0.5


@pytest.mark.parametrize("text", ["How do I kill a zombie process on Ubuntu?", "We shot the wedding video in 4K.",
                                  "My laptop died during the presentation."])
def test_look_alikes_are_not(tier: SemanticClassifier, text: str) -> None:
    assert max(tier.scores(text).values()) < 0.5
