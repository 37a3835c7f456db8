"""The pages genserve serves carry a Content-Security-Policy that admits only this origin and their own
inline scripts (by hash); Swagger UI does not keep a pasted key; ``/metrics`` renders off the event
loop, one render shared by the scrapes that arrive together."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import threading

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from genserve.app.metrics import Metrics, merge_exposition
from genserve.app.routers import docs, playground


def test_docs_pages_allow_their_own_inline_script_and_nothing_from_elsewhere() -> None:
    app = FastAPI(docs_url=None, redoc_url=None)
    app.include_router(docs.router)
    app.include_router(playground.router)
    with TestClient(app) as client:
        for path in ("/docs", "/redoc", "/playground"):
            page = client.get(path)
            policy = page.headers["content-security-policy"]
            assert policy.startswith("default-src 'self'; script-src 'self'"), (path, policy)
            assert "http" not in policy and "'unsafe-inline'" not in policy.split("script-src")[1].split(";")[0]
            for body in re.findall(r"<script>(.*?)</script>", page.text, re.S):
                digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
                assert f"'sha256-{digest}'" in policy, path
        swagger = client.get("/docs").text
        assert '"persistAuthorization": false' in swagger


def test_concurrent_scrapes_share_one_render_off_the_event_loop() -> None:
    metrics = Metrics()
    threads: list[str] = []
    render = metrics.render

    def slow_render() -> bytes:
        threads.append(threading.current_thread().name)
        threading.Event().wait(0.2)  # long enough for every scrape to arrive while it runs
        return render()

    metrics.render = slow_render  # type: ignore[method-assign]

    async def scrape() -> list[bytes]:
        bodies = await asyncio.gather(*(metrics.render_shared() for _ in range(8)))
        return [*bodies, await metrics.render_shared()]  # a later scrape renders anew

    bodies = asyncio.run(scrape())
    assert len(threads) == 2 and threading.main_thread().name not in threads
    assert all(b == bodies[0] for b in bodies[:8]) and b"genserve_" in bodies[0]


def replica_metrics(tokens: float, latency: float) -> Metrics:
    m = Metrics()
    m.generation_tokens.labels('odd "name"\\').inc(tokens)
    m.e2e_request_latency.labels("m").observe(latency)
    m.num_requests_running.labels("m").set(2)
    return m


def test_replicas_series_merge_into_one_exposition_with_their_labels() -> None:
    """Ray Serve: every replica's registry in one /metrics, one family per name (the text format's rule),
    each sample with its replica's labels; counters, histograms, gauges and escaped label values intact."""
    a, b = replica_metrics(5, 0.3), replica_metrics(7, 3.0)
    la, lb = {"deployment": "model-x", "replica": "r1"}, {"deployment": "model-x", "replica": "r2"}
    merged = merge_exposition([(la, a.render().decode()), (lb, b.render().decode())]).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    heads = [line for line in merged.splitlines() if line.startswith("# TYPE ")]
    assert len(heads) == len(set(heads))  # each family once
    tokens = families["genserve_generation_tokens"]
    assert tokens.type == "counter"
    assert sorted((s.labels["replica"], s.value) for s in tokens.samples) == [("r1", 5.0), ("r2", 7.0)]
    assert all(s.labels["model_name"] == 'odd "name"\\' and s.labels["deployment"] == "model-x"
               for s in tokens.samples)
    latency = families["genserve_e2e_request_latency_seconds"]
    assert latency.type == "histogram"
    le = {(s.labels["replica"], s.labels["le"]): s.value for s in latency.samples if s.name.endswith("_bucket")}
    assert le["r1", "0.5"] == 1 and le["r2", "0.5"] == 0 and le["r2", "5.0"] == 1
    assert sum(s.value for s in families["genserve_num_requests_running"].samples) == 4
    # Every series of one registry, and no more, came through for each replica.
    assert len(families["genserve_http_requests"].samples) == 0
    assert len([s for f in families.values() for s in f.samples]) == 2 * len(
        [s for f in text_string_to_metric_families(a.render().decode()) for s in f.samples])


def test_a_family_of_another_type_under_one_name_is_left_out_not_mixed(caplog: pytest.LogCaptureFixture) -> None:
    """Replicas of two versions during a rolling update: one exposes a name as a counter, the other as a
    gauge (prometheus_client's Counter("x") and Gauge("x")). The merged exposition keeps one type per name
    (the first), parses, and says what it left out."""
    old = "# HELP x_total things\n# TYPE x_total counter\nx_total 3.0\n"
    new = "# HELP x things now\n# TYPE x gauge\nx 5.0\n# TYPE y gauge\ny 1.0\n"  # a Gauge("x") now
    with caplog.at_level("WARNING", logger="genserve.app.metrics"):
        merged = merge_exposition([({"replica": "r1"}, old), ({"replica": "r2"}, new)]).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    assert families["x"].type == "counter" and [s.labels["replica"] for s in families["x"].samples] == ["r1"]
    assert [s.value for s in families["y"].samples] == [1.0]  # the rest of that replica's series stay
    assert "x" in caplog.text and "gauge" in caplog.text


def test_a_replicas_scrape_adds_what_gather_returns() -> None:
    metrics = Metrics()
    metrics.images.labels("gan").inc(3)
    seen: list[bytes] = []

    async def gather(own: bytes) -> bytes:
        seen.append(own)
        return merge_exposition([({"replica": "me"}, own.decode()),
                                 ({"replica": "other"}, replica_metrics(1, 1).render().decode())])

    metrics.gather = gather
    body = asyncio.run(metrics.render_shared()).decode()
    assert seen and b"genserve_images_total" in seen[0]
    assert 'genserve_images_total{model_name="gan",replica="me"} 3.0' in body
    assert 'replica="other"' in body
