"""Per-key scopes, rate limits, quotas and moderation through two live gateway replicas that share their
counts over a real Redis (app/tenancy.py): every request alternates between the replicas, so a count
that one replica kept to itself would let more through than the limit. The keys file is YAML, reread
on SIGHUP."""

from __future__ import annotations

import hashlib
import re
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
from openai import PermissionDeniedError

from tests.conftest import EMBED, TEXT, Server, launch_server, sdk, stop_server, wait_ready

UPSTREAM_SETS = ("text", "image")

KEYS = f"""keys:
  - {{name: scoped, key: sk-scoped, models: [remote-text]}}
  - {{name: rpm, key: sk-rpm, limits: {{per_minute: {{requests: 4}}}}}}
  - {{name: tpm, key_sha256: {hashlib.sha256(b"sk-tpm").hexdigest()}, limits: {{per_minute: {{tokens: 60}}}}}}
  - {{name: daily, key: sk-daily, limits: {{per_day: {{requests: 3}}}}}}
  - {{name: images, key: sk-images, modalities: [image], limits: {{per_minute: {{images: 3}}}}}}
  - {{name: strict, key: sk-strict, moderation: {{blocked_terms: [pineapple]}}}}
"""


@pytest.fixture(scope="module")
def replicas(server_sets, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    text, image = server_sets.get("text"), server_sets.get("image")
    registry = f"""include_defaults: false
models:
  - {{id: remote-text, modality: text, backend: remote, url: {text.url}/v1, upstream_model: {TEXT},
     api_key_env: UPSTREAM_KEY}}
  - {{id: remote-embed, modality: embedding, backend: remote, url: {text.url}/v1, upstream_model: {EMBED},
     api_key_env: UPSTREAM_KEY}}
  - {{id: remote-gan, modality: image, backend: remote, url: {image.url}/v1, upstream_model: genserve-gan,
     api_key_env: UPSTREAM_KEY}}
"""
    tmp = tmp_path_factory.mktemp("keys")
    keys = tmp / "keys.yaml"
    keys.write_text(KEYS)
    env = {"GENSERVE_API_KEYS": "", "GENSERVE_API_KEYS_FILE": str(keys), "GENSERVE_REDIS_URL": redis_url,
           "UPSTREAM_KEY": "test-key-123"}
    servers = [launch_server(tmp, f"replica{i}", registry, env) for i in range(2)]
    try:
        yield [wait_ready(s, timeout=120) for s in servers]
    finally:
        for s in servers:
            stop_server(s)


def _post(gw: Server, key: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _get(gw: Server, key: str, path: str) -> httpx.Response:
    return httpx.get(f"{gw.url}/v1{path}", headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _fresh_minute(needed_s: float) -> None:
    """Waits, if need be, until the current minute window has ``needed_s`` left: a test that straddled
    two windows would see its count restart."""
    left = 60 - time.time() % 60
    if left < needed_s:
        time.sleep(left + 0.05)


def _seconds(duration: str) -> float:
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:([\d.]+)s)?(?:(\d+)ms)?", duration)
    assert parts, duration
    h, m, s, ms = (float(p) if p else 0.0 for p in parts.groups())
    return h * 3600 + m * 60 + s + ms / 1000


def test_a_model_outside_the_keys_scope_is_403_and_unlisted(replicas: list[Server]) -> None:
    a, b = replicas
    chat = {"model": "remote-text", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    assert _post(a, "sk-scoped", "/chat/completions", chat).status_code == 200
    r = _post(b, "sk-scoped", "/embeddings", {"model": "remote-embed", "input": "hi"})
    assert r.status_code == 403
    assert r.json() == {"error": {"message": "This API key (scoped) may not use the model 'remote-embed'.",
                                  "type": "invalid_request_error", "param": "model", "code": "model_not_allowed"}}
    with pytest.raises(PermissionDeniedError):
        sdk(a.url, api_key="sk-scoped").embeddings.create(
            model="remote-embed", input="hi")
    assert [m["id"] for m in _get(a, "sk-scoped", "/models").json()["data"]] == ["remote-text"]
    assert _get(b, "sk-scoped", "/models/remote-embed").status_code == 404
    assert len(_get(b, "sk-strict", "/models").json()["data"]) == 3


def test_requests_per_minute_shared_by_two_replicas(replicas: list[Server]) -> None:
    _fresh_minute(5)
    seen = []
    for i in range(5):
        r = _get(replicas[i % 2], "sk-rpm", "/models")
        seen.append((r.status_code, r.headers.get("x-ratelimit-limit-requests"),
                     r.headers.get("x-ratelimit-remaining-requests")))
        reset = _seconds(r.headers["x-ratelimit-reset-requests"])
        assert 0 < reset <= 60
    assert seen == [(200, "4", "3"), (200, "4", "2"), (200, "4", "1"), (200, "4", "0"), (429, "4", "0")]
    body = r.json()["error"]
    assert body["type"] == "rate_limit_error" and body["code"] == "rate_limit_exceeded"
    assert body["message"].startswith("Rate limit reached for this API key (rpm): 4 requests per minute. Retry in ")
    assert 0 < int(r.headers["Retry-After"]) <= 60 and abs(int(r.headers["Retry-After"]) - reset) <= 1


def test_tokens_per_minute_count_what_was_generated_streamed_or_not(replicas: list[Server]) -> None:
    _fresh_minute(12)
    used, statuses, tokens = 0.0, [], 0
    for i in range(20):
        gw = replicas[i % 2]
        body = {"model": "remote-text", "prompt": "The json module", "max_tokens": 8, "temperature": 0}
        if i % 3 == 1:  # streamed, without asking for usage: still charged, as much as the same request unstreamed
            with httpx.stream("POST", f"{gw.url}/v1/completions", json={**body, "stream": True},
                              headers={"Authorization": "Bearer sk-tpm"}, timeout=60) as r:
                lines = [line for line in r.iter_lines() if line]
            if r.status_code == 200:
                assert lines[-1] == "data: [DONE]"
        else:
            r = _post(gw, "sk-tpm", "/completions", body)
            tokens = r.json()["usage"]["total_tokens"] if r.status_code == 200 else 0
        statuses.append(r.status_code)
        assert r.headers["x-ratelimit-limit-tokens"] == "60"
        assert int(r.headers["x-ratelimit-remaining-tokens"]) == max(0, 60 - int(used))
        if r.status_code == 429:
            assert r.headers["x-ratelimit-remaining-tokens"] == "0"
            break
        used += tokens
    # allowed while anything was left, refused at the first request after the 60 were used up
    assert statuses == [200] * (len(statuses) - 1) + [429] and used >= 60
    assert replicas[0].metric("genserve_key_usage_total", key_name="tpm", unit="tokens") + \
        replicas[1].metric("genserve_key_usage_total", key_name="tpm", unit="tokens") == used


def test_a_daily_quota_is_insufficient_quota_until_midnight(replicas: list[Server]) -> None:
    codes = [_get(replicas[i % 2], "sk-daily", "/models").status_code for i in range(4)]
    assert codes == [200, 200, 200, 429]
    r = _get(replicas[0], "sk-daily", "/models")
    assert r.json()["error"]["code"] == "insufficient_quota"
    assert "daily quota of 3 requests; it renews at 00:00 UTC" in r.json()["error"]["message"]
    assert abs(int(r.headers["Retry-After"]) - (86400 - time.time() % 86400)) <= 2
    assert "x-ratelimit-limit-requests" not in r.headers  # the headers show per-minute limits only


def test_images_per_minute(replicas: list[Server]) -> None:
    _fresh_minute(8)
    body = {"model": "remote-gan", "prompt": "3", "n": 2, "response_format": "b64_json"}
    first, second, third = (_post(replicas[i % 2], "sk-images", "/images/generations", body) for i in range(3))
    assert (first.status_code, first.headers["x-ratelimit-remaining-images"]) == (200, "3")
    assert (second.status_code, second.headers["x-ratelimit-remaining-images"]) == (200, "1")
    assert len(second.json()["data"]) == 2
    assert third.status_code == 429 and "3 images per minute" in third.json()["error"]["message"]
    assert _post(replicas[0], "sk-images", "/completions", {"model": "remote-text", "prompt": "x"}).status_code == 403
    # an endpoint without a model is scoped by its modality
    r = _post(replicas[1], "sk-images", "/molecules/properties", {"smiles": ["CCO"]})
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    assert _post(replicas[1], "sk-scoped", "/molecules/properties", {"smiles": ["CCO", "c1ccccc1"]}).status_code == 200


def test_tokens_a_client_read_before_leaving_are_charged(replicas: list[Server]) -> None:
    """A stream the client closes after its first tokens, before any usage chunk: what was made counts."""
    gw = replicas[0]
    before = gw.metric("genserve_key_usage_total", key_name="scoped", unit="tokens")
    body = {"model": "remote-text", "prompt": "The json module", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, headers={"Authorization": "Bearer sk-scoped"},
                      timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
    deadline = time.monotonic() + 10
    while gw.metric("genserve_key_usage_total", key_name="scoped", unit="tokens") == before:
        assert time.monotonic() < deadline, "the tokens of a stream cut short were not charged"
        time.sleep(0.1)
    assert 0 < gw.metric("genserve_key_usage_total", key_name="scoped", unit="tokens") - before < 200


def test_a_keys_moderation_is_stricter_than_the_models(replicas: list[Server]) -> None:
    body = {"model": "remote-text", "max_tokens": 2, "messages": [{"role": "user", "content": "A pineapple pizza"}]}
    assert _post(replicas[0], "sk-scoped", "/chat/completions", body).status_code == 200
    r = _post(replicas[1], "sk-strict", "/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_policy_violation"


def test_metrics_count_by_key_name_never_the_key(replicas: list[Server]) -> None:
    text = "".join(httpx.get(f"{gw.url}/metrics").text for gw in replicas)
    assert 'genserve_key_rate_limited_total{key_name="rpm",period="per_minute",unit="requests"}' in text
    assert 'genserve_key_usage_total{key_name="scoped",unit="requests"}' in text
    assert "sk-" not in text


def test_sighup_rereads_the_keys_file_and_a_bad_one_keeps_the_old_keys(replicas: list[Server]) -> None:
    keys = replicas[0].log.parent / "keys.yaml"
    assert _get(replicas[0], "sk-late", "/models").status_code == 401
    keys.write_text(KEYS + "  - {name: late, key: sk-late}\n")
    for gw in replicas:
        gw.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while any(_get(gw, "sk-late", "/models").status_code != 200 for gw in replicas):
        assert time.monotonic() < deadline, "SIGHUP did not reload the keys"
        time.sleep(0.1)
    keys.write_text("keys:\n  - {name: broken}\n")
    for gw in replicas:
        gw.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while any("keys not reloaded" not in gw.log.read_text() for gw in replicas):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert all(_get(gw, "sk-late", "/models").status_code == 200 for gw in replicas)
    assert "keys[0]: Value error, give exactly one of 'key' and 'key_sha256'" in replicas[0].log.read_text()
