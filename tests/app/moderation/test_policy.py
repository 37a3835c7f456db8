"""Policies: the strictest of global and model wins; a request cannot weaken them; bad fields are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from genserve.app.moderation.policy import DEFAULT_THRESHOLD, Policy, PolicyPatch
from genserve.app.registry import ConfigError, load_registry


def test_defaults_are_on_and_block() -> None:
    p = Policy()
    assert p.checks_input and p.checks_output and p.action == "block" and p.on_error == "fail_closed"
    assert p.threshold("harassment") == DEFAULT_THRESHOLD and p.dual_use


def test_a_model_can_tighten_and_never_loosen() -> None:
    g = Policy(thresholds={"hate": 0.4}, blocked_terms=("alpha",), holdback_chars=32)
    loose = PolicyPatch(input=False, output=False, action="flag", thresholds={"hate": 0.9},
                        holdback_chars=8, on_error="fail_open", dual_use=False)
    merged = g.stricter(loose)
    assert merged.input and merged.output and merged.action == "block" and merged.on_error == "fail_closed"
    assert merged.threshold("hate") == 0.4 and merged.holdback_chars == 32 and merged.dual_use
    tight = g.stricter(PolicyPatch(thresholds={"hate": 0.2, "violence": 0.3}, blocked_terms=["beta"]))
    assert tight.threshold("hate") == 0.2 and tight.threshold("violence") == 0.3
    assert tight.blocked_terms == ("alpha", "beta")


def test_global_off_makes_a_model_block_its_whole_policy() -> None:
    off = Policy(enabled=False)
    assert not off.checks_input and not off.checks_output
    assert off.stricter(None) is off
    on = off.stricter(PolicyPatch(blocked_terms=["gamma"]))
    assert on.checks_input and on.checks_output and on.blocked_terms == ("gamma",)
    plain = off.stricter(PolicyPatch(input=True))
    assert plain.blocked_terms == () and hash(plain.blocked_terms) is not None  # keys the term matcher cache


@pytest.mark.parametrize(("block", "field"), [
    ("{thresholds: {violence/graphics: 0.5}}", "thresholds"),
    ("{thresholds: {hate: 1.5}}", "thresholds"),
    ("{blocked_terms: ['re:(unclosed']}", "blocked_terms"),
    ("{action: warn}", "action"),
    ("{holdback_chars: 0}", "holdback_chars"),
    ("{image_checker: /nonexistent/dir}", "image_checker"),
    ("{colour: red}", "colour"),
])
def test_registry_validation_names_the_field(tmp_path: Path, block: str, field: str) -> None:
    cfg = tmp_path / "r.yaml"
    cfg.write_text("models:\n  - id: m\n    modality: text\n    backend: remote\n    url: http://127.0.0.1:9/v1\n"
                   f"    moderation: {block}\n")
    with pytest.raises(ConfigError, match=rf"models\[0\] \(id 'm'\)\.moderation\.{field}"):
        load_registry(cfg)
