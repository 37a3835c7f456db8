"""A guard model (family ``llama-guard``) served from the registry: answering ``/v1/moderations`` and
checking a text model's inputs as its policy's ``guard_model``, failing closed when it cannot answer.

The shipped text model is no guard (it answers neither "safe" nor "unsafe"), so nothing it judges is
flagged; ``tests/app/moderation/test_guard.py`` checks the prompt and the score against transformers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from genserve.app.moderation.categories import CATEGORIES
from genserve.cli import main
from tests.conftest import TEXT_DIR, Server

SERVER_SET = "guard"  # tests/conftest.py: loads with the session's other servers


def test_the_guard_answers_moderations(server: Server) -> None:
    with server.client() as c:
        r = c.post("/v1/moderations", json={"model": "tiny-guard", "input": ["hello there", "how are you"]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2 and all(set(x["category_scores"]) == set(CATEGORIES) for x in results)
    assert all(x["category_applied_input_types"]["hate"] == ["text"] for x in results)


def test_a_policy_guard_model_checks_inputs_and_fails_closed(server: Server) -> None:
    with server.client() as c:
        ok = c.post("/v1/completions", json={"model": "guarded", "prompt": "The json module", "max_tokens": 4})
        assert ok.status_code == 200, ok.text
        # The guard's prompt with this input does not fit its 512-token context: the guard cannot answer,
        # and the policy (fail_closed by default) refuses what it cannot check.
        long = " ".join(["the json module parses text"] * 80)
        r = c.post("/v1/completions", json={"model": "guarded", "prompt": long, "max_tokens": 4})
    assert r.status_code == 503 and r.json()["error"]["code"] == "moderation_unavailable"
    assert server.metric("genserve_moderation_failures_total", model_name="guarded", on_error="fail_closed") >= 1


def test_a_guard_model_that_is_not_in_the_registry_is_refused_at_start(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"""include_defaults: false
models:
  - id: t
    modality: text
    backend: local
    family: llama
    source: {TEXT_DIR}
    moderation: {{guard_model: nope}}
""")
    assert main(["serve", "--config", str(cfg), "--port", "1"]) == 2
    assert "models[0] (id 't').moderation.guard_model: 'nope' is not a moderation model" in capsys.readouterr().err
