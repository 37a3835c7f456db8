"""Provenance of text over HTTP: what responses say of their marks, and ``/v1/provenance/verify``
finding genserve's watermark in sampled output (naming the model) and not in text it did not make."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI

from genserve.models.llama.corpus import pydoc_topics
from tests.conftest import TEXT, Server, sdk
from tests.e2e.test_errors import assert_openai_error

QUESTION = [{"role": "user", "content": "What does os.path.join do?"}]


def verify(server: Server, **body: object) -> httpx.Response:
    with server.client() as c:
        return c.post("/v1/provenance/verify", json=body)


@pytest.fixture(scope="module")
def sampled(openai_client: OpenAI) -> list[tuple[str, dict]]:
    """Two 200-token answers of the shipped model at temperature 1.0 and 0.7, with their provenance."""
    out = []
    for temperature, seed in ((1.0, 1), (0.7, 2)):
        r = openai_client.chat.completions.create(model=TEXT, messages=QUESTION, max_tokens=200, seed=seed,
                                                  temperature=temperature, extra_body={"ignore_eos": True})
        out.append((r.choices[0].message.content, r.model_extra["provenance"]))
    return out


def test_sampled_text_says_it_is_watermarked_and_verify_finds_that_models_mark(server: Server, sampled) -> None:
    for text, provenance in sampled:
        assert provenance == {"ai_generated": True, "generator": provenance["generator"], "model": TEXT,
                              "watermarked": True, "scheme": "kirchenbauer-lefthash-v1", "c2pa": False, "reason": None}
        assert provenance["generator"].startswith("genserve/")
        r = verify(server, text=text)
        assert r.status_code == 200, r.text
        v = r.json()
        assert v["object"] == "provenance.verification" and v["c2pa"] is None
        w = v["watermark"]
        # The text set runs two watermarked models; each has its own key, so the verdict names the right one.
        assert w["detected"] and w["model"] == TEXT and sorted(w["models_checked"]) == sorted([TEXT, "tiny-fp32"])
        assert w["z_score"] > w["threshold"] == 4.0 and w["p_value"] < 1e-4 and w["tokens_scored"] > 100
        only = verify(server, text=text, model="tiny-fp32").json()["watermark"]  # the other model's key
        assert not only["detected"] and only["model"] is None and only["models_checked"] == ["tiny-fp32"]


def test_text_genserve_did_not_make_is_not_detected(server: Server) -> None:
    # Python's reference topics, written by people (the rates over 4,024 such windows: docs/benchmarks.md)
    human = [d.text for d in pydoc_topics() if len(d.text) > 800][:5]
    assert len(human) == 5
    for text in human:
        w = verify(server, text=text).json()["watermark"]
        assert not w["detected"] and w["model"] is None and w["z_score"] < 4.0, w


def test_greedy_output_and_a_stream_say_what_they_carry(server: Server) -> None:
    body = {"model": TEXT, "messages": QUESTION, "max_tokens": 8, "temperature": 0}
    with server.client() as c:
        greedy = c.post("/v1/chat/completions", json=body).json()["provenance"]
        assert greedy["watermarked"] is False and greedy["scheme"] is None and "greedy" in greedy["reason"]
        with c.stream("POST", "/v1/completions", json={"model": TEXT, "prompt": "The json module", "max_tokens": 8,
                                                       "temperature": 0.8, "stream": True}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["provenance"]["watermarked"] is True and chunks[0]["provenance"]["model"] == TEXT
    assert all("provenance" not in c for c in chunks[1:])  # said once, in the first chunk


def test_a_remote_model_is_never_claimed_watermarked(gateway: Server) -> None:
    r = sdk(gateway.url).chat.completions.create(model="remote-text", messages=QUESTION, max_tokens=8, temperature=0.8)
    p = r.model_extra["provenance"]
    assert p["watermarked"] is False and p["model"] == "remote-text" and "remote" in p["reason"]
    assert_openai_error(verify(gateway, text="some text to check"), 400, "text")  # nothing to check it against


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"text": ""}, 400, "text"),
    ({"text": "A short sentence is not enough to check."}, 400, "text"),  # under 50 distinct token pairs
    ({}, 400, "text"),
    ({"text": "x" * 200_001}, 413, "text"),
    ({"text": "hello there", "model": "no-such-model"}, 400, "model"),
    ({"text": "hello there", "model": "all-minilm-l6-v2"}, 400, "model"),  # not a watermarked text model
    ({"text": 42}, 400, "text"),
])
def test_bad_verify_requests_are_openai_errors(server: Server, body: dict, status: int, param: str) -> None:
    assert_openai_error(verify(server, **body), status, param)
