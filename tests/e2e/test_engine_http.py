"""The engine behind HTTP: concurrent requests share its steps, seeds hold inside a shared batch,
and its gauges and histograms reach /metrics."""

from __future__ import annotations

import concurrent.futures

from tests.conftest import Server

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
