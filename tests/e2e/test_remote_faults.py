"""A gateway in front of a misbehaving OpenAI-compatible upstream answers 4xx/502 with OpenAI's
body, never a 500. The upstream here stands in for a third-party server; each model name picks
one way of being wrong."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from tests.conftest import Server, free_port, start_server, stop_server
from tests.e2e.test_errors import assert_openai_error

CHUNK = '{"id":"x","object":"text_completion","created":0,"model":"m","choices":[{"index":0,"text":"hi"}]}'
STREAMS = {
    "done-only": ["[DONE]"],
    "not-object": ["[1, 2]", "[DONE]"],
    "error-400-first": ['{"error":{"object":"error","message":"bad prompt","type":"BadRequestError","code":400}}'],
    "error-after-text": [CHUNK, '{"error":{"message":"engine died","type":"InternalServerError","code":500}}'],
    "bad-choice": ['{"choices":[{"index":0,"logprobs":{"tokens":["a"]}}]}', "[DONE]"],
}


def upstream_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": []}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        model = (await request.json())["model"]
        if model == "json-not-sse":
            return JSONResponse({"choices": [{"index": 0, "text": "hi"}]})
        if model == "unauthorized":
            return JSONResponse({"error": {"message": "bad key", "code": "invalid_api_key"}}, status_code=401)
        if model == "busy":
            return JSONResponse({"error": {"message": "slow down"}}, status_code=429, headers={"Retry-After": "7"})
        lines = "".join(f"data: {d}\n\n" for d in STREAMS[model])
        return StreamingResponse(iter([lines]), media_type="text/event-stream")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        model = (await request.json())["model"]
        if model == "html":
            return HTMLResponse("<html>proxy error</html>")
        if model == "too-few":
            return JSONResponse({"object": "list", "data": []})
        return JSONResponse({"object": "list"})

    return app


@pytest.fixture(scope="module")
def faulty_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    upstream = uvicorn.Server(uvicorn.Config(upstream_app(), port=port, log_level="warning"))
    thread = threading.Thread(target=upstream.run, daemon=True)
    thread.start()
    while not upstream.started:
        time.sleep(0.05)
    names = [*STREAMS, "json-not-sse", "unauthorized", "busy", "html", "too-few", "no-data"]
    entries = "".join(
        f"  - id: {n}\n    modality: {'embedding' if n in ('html', 'too-few', 'no-data') else 'text'}\n"
        f"    backend: remote\n    url: http://127.0.0.1:{port}/v1\n" for n in names)
    # Moderation off: these are the upstream's faults. With it on, the hold-back gate would keep the
    # two characters sent before an error (test_moderation_remote.py tests the gate on remote streams).
    gw = start_server(tmp_path_factory.mktemp("faulty"), "faulty", "include_defaults: false\nmodels:\n" + entries,
                      {"GENSERVE_MODERATION": '{"enabled": false}'}, ready_path="/health/live")
    yield gw
    stop_server(gw)
    upstream.should_exit = True
    thread.join(5)


@pytest.mark.parametrize(("model", "status", "code"), [
    ("done-only", 502, "bad_upstream_response"),
    ("not-object", 502, "bad_upstream_response"),
    ("bad-choice", 502, "bad_upstream_response"),
    ("json-not-sse", 502, "bad_upstream_response"),
    ("error-400-first", 400, None),
    ("unauthorized", 503, "model_not_ready"),
    ("busy", 429, "queue_full"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_faults_before_any_output(faulty_gateway: Server, model: str, status: int, code: str | None,
                                          stream: bool) -> None:
    with faulty_gateway.client() as client:
        r = client.post("/v1/completions", json={"model": model, "prompt": "x", "stream": stream})
    assert_openai_error(r, status, None)
    assert r.json()["error"]["code"] == code
    if model == "busy":
        assert r.headers["retry-after"] == "7"


def test_upstream_error_mid_stream_becomes_an_error_event(faulty_gateway: Server) -> None:
    with faulty_gateway.client() as client:
        r = client.post("/v1/completions", json={"model": "error-after-text", "prompt": "x", "stream": True})
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert '"text": "hi"' in events[0] and "engine died" in events[-2] and events[-1] == "[DONE]"


@pytest.mark.parametrize("model", ["html", "too-few", "no-data"])
def test_malformed_embeddings_are_502(faulty_gateway: Server, model: str) -> None:
    with faulty_gateway.client() as client:
        r = client.post("/v1/embeddings", json={"model": model, "input": "x"})
    assert_openai_error(r, 502, None)


def test_upstream_errors_are_not_counted_as_aborts(faulty_gateway: Server) -> None:
    with faulty_gateway.client() as client:
        for model in ("error-400-first", "done-only"):
            client.post("/v1/completions", json={"model": model, "prompt": "x"})
    for model in ("error-400-first", "done-only"):
        assert faulty_gateway.metric("genserve_request_success_total", model_name=model) == 0
