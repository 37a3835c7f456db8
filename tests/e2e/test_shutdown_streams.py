"""SIGTERM with a queue behind one running request, and under load: 4 streams, 4 non-streamed requests
and 4 queued behind them. Nothing is cut silently: running work finishes with its real finish_reason
and [DONE] within the grace; what the grace cannot cover ends with an SSE error event (streams) or
OpenAI's 503 (the rest); queued requests get the 503 at once. (sse-starlette used to end every stream
0.5 s after the signal with no [DONE].)"""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import API_KEY, Server, launch_server, text_entry, wait_ready
from tests.e2e.test_errors import assert_openai_error

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _stream(url: str, body: dict) -> dict:
    """What a client of one stream saw: its finish reasons, error events, tokens and whether [DONE] came."""
    seen: dict = {"finish": set(), "errors": [], "chunks": 0, "done": False, "status": None}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, headers=HEADERS,
                      timeout=60) as r:
        seen["status"] = r.status_code
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                seen["done"] = True
                continue
            event = json.loads(data)
            if "error" in event:
                seen["errors"].append(event["error"])
            for choice in event.get("choices", []):
                seen["chunks"] += 1
                if choice["finish_reason"]:
                    seen["finish"].add(choice["finish_reason"])
    return seen


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, headers=HEADERS, timeout=60)


GRACES = {"long": (30.0, 1), "short": (1.5, 4)}  # grace seconds, choices per request


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """Every scenario's server, loading at once (each test then stops its own with SIGTERM)."""
    launched = {}
    # One sequence per step, so that one request runs and the others wait in the queue.
    queue_registry = "include_defaults: false\nmodels:\n" + text_entry("tiny-drain", max_batch_size=1)
    launched["queue"] = launch_server(tmp_path_factory.mktemp("queue"), "drain", queue_registry, {})
    for name, (grace_s, n) in GRACES.items():
        # 8 requests' sequences a step at most, so 4 streams and 4 requests run and 4 more wait in the queue.
        registry = "include_defaults: false\nmodels:\n" + text_entry("tiny-drain", max_batch_size=8 * n)
        launched[name] = launch_server(tmp_path_factory.mktemp(name), "drain", registry, {
            "GENSERVE_SHUTDOWN_GRACE_S": str(grace_s), "GENSERVE_MODERATION": '{"enabled": false}'})
    yield launched
    for srv in launched.values():
        if srv.proc.poll() is None:
            srv.proc.kill()


def _under_sigterm(srv: Server, max_tokens: int, n: int) -> tuple[list, list, list, int | None]:
    wait_ready(srv)
    body = {"model": "tiny-drain", "prompt": "The json module", "max_tokens": max_tokens, "ignore_eos": True, "n": n}
    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            streams = [pool.submit(_stream, srv.url, body) for _ in range(4)]
            unary = [pool.submit(_post, srv.url, body) for _ in range(4)]
            time.sleep(0.5)  # all eight running
            queued = [pool.submit(_post, srv.url, body) for _ in range(4)]
            time.sleep(0.3)
            srv.proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in streams], [f.result() for f in unary], [f.result() for f in queued]
        code = srv.proc.wait(30)
        log = srv.log.read_text()
        assert "Traceback" not in log and " ERROR " not in log and "ERROR:" not in log, log[-3000:]
        return (*results, code)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


def test_sigterm_lets_running_streams_and_requests_finish_and_turns_queued_away(servers: dict[str, Server]) -> None:
    # 400 tokens: the first eight still run when the signal comes 0.8 s in, so the last four are queued.
    streams, unary, queued, code = _under_sigterm(servers["long"], max_tokens=400, n=GRACES["long"][1])
    for s in streams:
        assert s["status"] == 200 and s["finish"] == {"length"} and s["done"] and not s["errors"], s
    for r in unary:
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 400
    for r in queued:
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    assert code == 0  # a stop asked for and done cleanly


def test_work_the_grace_cannot_cover_ends_with_an_error_event_or_a_503(servers: dict[str, Server]) -> None:
    # Long work, beyond a 1.5 s grace: 4 choices of 480 tokens each per request, 32 sequences in every step.
    streams, unary, queued, code = _under_sigterm(servers["short"], max_tokens=480, n=GRACES["short"][1])
    for s in streams:
        assert s["status"] == 200 and s["done"], s
        assert s["errors"] and "shutting down" in s["errors"][0]["message"], s  # said, not silent
        assert "length" not in s["finish"], "this work was meant to outlast the grace"
    for r in unary + queued:
        assert r.status_code == 503 and r.json()["error"]["message"], r.text
    assert code == 0


def test_sigterm_drains_the_queue_and_finishes_running_work(servers: dict[str, Server]) -> None:
    srv = wait_ready(servers["queue"])
    body = {"model": "tiny-drain", "prompt": "The json module", "max_tokens": 300, "ignore_eos": True}
    # The running request must outlast the two waits below: 480 tokens at 2 ms a step is about 1 s (300
    # finished within them on a fast CPU, and a queued request then ran to its end).
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            running = pool.submit(_post, srv.url, {**body, "max_tokens": 480})
            time.sleep(0.3)  # the first request is in the engine's batch
            queued = [pool.submit(_post, srv.url, body) for _ in range(3)]
            time.sleep(0.2)  # the others are in its queue (one that is not yet gets its 503 as a new request)
            sent = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            for f in queued:
                r = f.result()
                assert_openai_error(r, 503, None)
                assert "shutting down" in r.json()["error"]["message"]
            answered = time.monotonic() - sent
            done = running.result()
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 480
        assert answered < 2.0  # at once, not after the running request or the grace period
        # A stop asked for and done cleanly exits 0 (`make serve` prints no "Error 143"), logging no ERROR.
        assert srv.proc.wait(30) == 0
        log = srv.log.read_text()
        assert "Application shutdown complete" in log and "stopped cleanly (signal 15)" in log
        assert "Traceback" not in log and " ERROR " not in log and " WARNING " not in log
        # One line says the server is ready, where, with what, after how long.
        assert re.search(rf"INFO genserve.app.backends.manager: ready in \d+\.\d s: 1 model \(tiny-drain\) at "
                         rf"{srv.url}/v1 \| docs {srv.url}/docs \| playground {srv.url}/playground\n", log), log
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
