"""The pages genserve serves carry a Content-Security-Policy that admits only this origin and their own
inline scripts (by hash); Swagger UI does not keep a pasted key; ``/metrics`` renders off the event
loop, one render shared by the scrapes that arrive together."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import threading

from fastapi import FastAPI
from fastapi.testclient import TestClient

from genserve.app.metrics import Metrics
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
