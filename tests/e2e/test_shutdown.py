"""SIGTERM: the running request finishes, queued ones get an OpenAI-shaped 503 at once."""

from __future__ import annotations

import concurrent.futures
import re
import signal
import time
from pathlib import Path

import httpx

from tests.conftest import API_KEY, start_server, text_entry
from tests.e2e.test_errors import assert_openai_error


def test_sigterm_drains_the_queue_and_finishes_running_work(tmp_path: Path) -> None:
    # One sequence per step, so the others wait in the queue.
    registry = "include_defaults: false\nmodels:\n" + text_entry("tiny-drain", max_batch_size=1)
    srv = start_server(tmp_path, "drain", registry, {})
    body = {"model": "tiny-drain", "prompt": "The json module", "max_tokens": 300, "ignore_eos": True}

    def post(_: int) -> httpx.Response:
        return httpx.post(srv.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=60)

    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            running = pool.submit(post, 0)
            time.sleep(0.3)  # the first request is in the engine's batch
            queued = [pool.submit(post, i) for i in range(1, 4)]
            time.sleep(0.3)  # the others are in its queue
            sent = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            for f in queued:
                r = f.result()
                assert_openai_error(r, 503, None)
                assert "shutting down" in r.json()["error"]["message"]
            answered = time.monotonic() - sent
            done = running.result()
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 300
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
