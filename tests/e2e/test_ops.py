"""Health, metrics and the offline docs page."""

from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import pytest

from tests.conftest import TEXT, Server


def test_health(server: Server) -> None:
    assert httpx.get(server.url + "/health/live").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/health/ready")
    assert ready.status_code == 200 and all(ready.json()["models"].values())


def test_metrics_after_a_request(server: Server) -> None:
    with server.client() as client:
        assert client.post("/v1/completions", json={"model": TEXT, "prompt": "import os", "max_tokens": 4,
                                                    "stream": True}).status_code == 200
    text = httpx.get(server.url + "/metrics").text
    for name in ("genserve_time_to_first_token_seconds_count", "genserve_inter_token_latency_seconds_count",
                 "genserve_e2e_request_latency_seconds_count", "genserve_request_queue_time_seconds_count",
                 "genserve_prompt_tokens_total", "genserve_generation_tokens_total",
                 "genserve_num_requests_running", "genserve_num_requests_waiting"):
        assert server.metric(name, model_name=TEXT) > 0 or name.startswith("genserve_num_"), name
        assert f'{name}{{model_name="{TEXT}"}}' in text, name
    assert server.metric("genserve_http_requests_total", route="/v1/completions", status="200") >= 1
    with server.client() as client:
        assert client.get(f"/v1/models/{TEXT}").status_code == 200
    # Labels carry the route template, never the raw path (ids would explode the series).
    assert server.metric("genserve_http_requests_total", route="/v1/models/{model_id:path}") >= 1
    assert f'route="/v1/models/{TEXT}"' not in httpx.get(server.url + "/metrics").text
    assert server.metric("genserve_model_ready", model_name=TEXT) == 1


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_nothing_from_outside(server: Server, page: str) -> None:
    html = httpx.get(server.url + page).text
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(assets) >= 2
    for asset in assets:
        assert httpx.get(server.url + asset).status_code == 200, asset


def test_swagger_ui_can_render_openapi_31(server: Server) -> None:
    """Swagger UI 4.x shows "Unable to render this definition" for OpenAPI 3.1; 5.x knows 3.1."""
    assert httpx.get(server.url + "/openapi.json").json()["openapi"].startswith("3.1")
    bundle = httpx.get(server.url + "/static/docs/swagger-ui-bundle.js").text
    assert "isOAS31" in bundle


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium for a headless render")
def test_docs_render_in_a_browser(server: Server, tmp_path) -> None:
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path}", "--virtual-time-budget=8000", "--dump-dom", server.url + "/docs"],
        capture_output=True, text=True, timeout=90).stdout
    assert "Unable to render" not in dom
    assert "/v1/chat/completions" in dom and "Authorize" in dom


def test_openapi_has_auth_and_examples(server: Server) -> None:
    spec = httpx.get(server.url + "/openapi.json").json()
    assert spec["components"]["securitySchemes"]["APIKey"]["scheme"].lower() == "bearer"
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models"):
        assert path in spec["paths"]
    op = spec["paths"]["/v1/chat/completions"]["post"]
    assert op["security"] == [{"APIKey": []}]
    assert "text/event-stream" in op["responses"]["200"]["content"]
    schema = spec["components"]["schemas"]["ChatCompletionRequest"]
    assert schema["examples"][0]["model"] == TEXT
