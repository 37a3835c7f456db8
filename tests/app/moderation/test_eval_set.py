"""The labelled evaluation set of benchmarks/moderation_eval.py is well formed."""

from __future__ import annotations

import json
from pathlib import Path

from genserve.app.moderation.categories import CATEGORIES

DATA = Path(__file__).resolve().parents[3] / "benchmarks" / "data" / "moderation_eval.jsonl"
MINIMUM = {"threat": 50, "self_harm_intent": 50, "slur": 40, "harassment": 20, "sexual": 15, "illicit_violent": 15,
           "benign_lookalike": 100, "benign": 40}


def test_the_set_is_well_formed() -> None:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    assert len({r["id"] for r in rows}) == len(rows) >= 300
    assert len({r["text"] for r in rows}) == len(rows)
    for group, least in MINIMUM.items():
        assert sum(r["group"] == group for r in rows) >= least, group
    for r in rows:
        assert r["group"] in MINIMUM and set(r["categories"]) <= set(CATEGORIES), r["id"]
        assert bool(r["categories"]) == (not r["group"].startswith("benign")), r["id"]


def test_the_blind_sets_are_well_formed_and_share_no_text_with_the_tuning_set() -> None:
    """The sets written later by someone who had not read the classifiers nor the first set (measured once,
    never tuned on): the same format and groups, and no text of the set the semantic tier was tuned on."""
    tuned = {json.loads(line)["text"].casefold() for line in DATA.read_text().splitlines()}
    paths = sorted(DATA.parent.glob("moderation_eval_*.jsonl"))
    assert paths
    for path in paths:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len({r["id"] for r in rows}) == len(rows) >= 250, path.name
        assert len({r["text"] for r in rows}) == len(rows), path.name
        assert not {r["text"].casefold() for r in rows} & tuned, path.name
        for r in rows:
            assert r["group"] in MINIMUM and set(r["categories"]) <= set(CATEGORIES), r["id"]
            assert bool(r["categories"]) == (not r["group"].startswith("benign")), r["id"]
