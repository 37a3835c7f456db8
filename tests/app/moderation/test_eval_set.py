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
