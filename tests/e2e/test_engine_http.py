"""The engine behind HTTP: concurrent requests share its steps, seeds hold inside a shared batch,
and its gauges and histograms reach /metrics."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import time
from pathlib import Path

import httpx

from tests.conftest import API_KEY, Server

MODEL = "genserve-text-tiny"


def complete(server: Server, **body: object) -> dict:
    with server.client() as client:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "The json module", **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_concurrent_requests_share_engine_steps_and_seeds_hold(server: Server) -> None:
    steps = server.metric("genserve_batch_size_count", model_name=MODEL)
    seqs = server.metric("genserve_batch_size_sum", model_name=MODEL)
    seeded = {"max_tokens": 24, "temperature": 0.8, "seed": 42, "ignore_eos": True}
    alone = complete(server, **seeded)["choices"][0]["text"]
    others = [{"max_tokens": 40, "temperature": 1.0, "ignore_eos": True, "prompt": "def " * (i + 1)}
              for i in range(15)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(complete, server, **body) for body in others]
        mine = pool.submit(complete, server, **seeded)
        results = [f.result() for f in futures]
    assert mine.result()["choices"][0]["text"] == alone
    assert all(r["usage"]["completion_tokens"] == 40 for r in results)
    steps = server.metric("genserve_batch_size_count", model_name=MODEL) - steps
    seqs = server.metric("genserve_batch_size_sum", model_name=MODEL) - seqs
    assert seqs == 24 + 15 * 40 + 24  # one sequence-step per generated token
    assert seqs / steps > 4, f"{seqs / steps:.1f} sequences per step: requests did not share steps"
    assert server.metric("genserve_iteration_tokens_total_count", model_name=MODEL) >= steps
    assert server.metric("genserve_kv_cache_usage_perc", model_name=MODEL) == 0.0  # all freed
    assert server.metric("genserve_num_requests_running", model_name=MODEL) == 0.0


def engine_children(server_pid: int) -> list[int]:
    """The server's engine processes: multiprocessing children started with spawn."""
    kids = [k for t in Path(f"/proc/{server_pid}/task").iterdir() for k in (t / "children").read_text().split()]
    return [int(k) for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def engine_of(server: Server, model: str) -> int:
    """The process id of ``model``'s engine, from the server's log (its start, or its latest restart)."""
    pattern = rf"(?:{model}: engine process|engine of {model} restarted \(process) (\d+)"
    found = re.findall(pattern, server.log.read_text())
    return int(found[-1])


def test_a_dead_engine_fails_its_requests_fast_and_comes_back(server: Server) -> None:
    # tiny-fp32 of the session's text server (the model only test_openai_sdk.py also uses, and only
    # once it is back): no server of its own to start, which took most of this test's time.
    model = "tiny-fp32"
    children = engine_children(server.proc.pid)
    child = engine_of(server, model)
    assert child in children
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": model, "prompt": "The json module", "max_tokens": 480,
                            "ignore_eos": True, "stream": True}, timeout=30) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        os.kill(child, signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and '"error"' in rest[-2]  # the stream ends with an error event
    assert httpx.get(server.url + "/health/ready", timeout=5).status_code == 503
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": model, "prompt": "x", "max_tokens": 4}, timeout=10)
    assert r.status_code == 503 and "restarting" in r.json()["error"]["message"]
    assert r.headers["retry-after"] == "5"
    deadline = time.monotonic() + 60  # a new engine process loads after a 1 s back-off
    while httpx.get(server.url + "/health/ready", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the engine did not come back"
        time.sleep(0.5)
    now = engine_children(server.proc.pid)
    assert child not in now and len(now) == len(children) and engine_of(server, model) in now
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": model, "prompt": "x", "max_tokens": 4, "ignore_eos": True}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4  # the new engine generates
