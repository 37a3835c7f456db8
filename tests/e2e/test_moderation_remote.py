"""Output moderation in front of a ``remote`` upstream that streams one character (or a few) per chunk.

The upstream stands in for vLLM: it streams the text the test asks for (the prompt is a JSON script in
base64),
``chunk`` characters per SSE event, interleaving ``n`` choices, and records whether each stream was
read to its end or closed early. A blocked phrase is placed at every position of the text; the
client must never receive a character of it, the choice ends with ``content_filter``, and once no
choice is wanted the gateway closes the upstream stream (the upstream request is aborted).
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from tests.conftest import API_KEY, Server, free_port, start_server, stop_server

PHRASE = "purple walrus"
BASE = "the cat sat on the warm mat by the door. "
CLEAN = "a quiet evening with tea and a good book by the window while the rain fell softly outside. "


class Upstream:
    def __init__(self) -> None:
        self.finished: list[bool] = []  # per request: read to the end (True) or closed early (False)
        self.app = FastAPI()
        self.app.get("/v1/models")(self.models)
        self.app.post("/v1/completions")(self.completions)

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": "script", "object": "model"}]}

    async def completions(self, request: Request) -> StreamingResponse:
        body = await request.json()
        script = json.loads(base64.b64decode(body["prompt"]))
        texts, size = script["texts"], script["chunk"]
        slot = len(self.finished)
        self.finished.append(False)

        async def events() -> Iterator[str]:
            pos = [0] * len(texts)
            while any(p < len(t) for p, t in zip(pos, texts, strict=True)):
                for i, t in enumerate(texts):
                    if pos[i] < len(t):
                        piece, pos[i] = t[pos[i]:pos[i] + size], pos[i] + size
                        done = "stop" if pos[i] >= len(t) else None
                        yield "data: " + json.dumps({"id": "c", "object": "text_completion", "created": 0,
                                                     "model": "script", "choices": [
                                                         {"index": i, "text": piece, "finish_reason": done}]}) + "\n\n"
                        await asyncio.sleep(0.001)
            yield "data: " + json.dumps({"id": "c", "object": "text_completion", "created": 0, "model": "script",
                                         "choices": [], "usage": {"prompt_tokens": 3,
                                                                  "completion_tokens": sum(map(len, texts))}}) + "\n\n"
            yield "data: [DONE]\n\n"
            self.finished[slot] = True

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[Upstream, int]]:
    up, port = Upstream(), free_port()
    server = uvicorn.Server(uvicorn.Config(up.app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield up, port
    server.should_exit = True
    thread.join(5)


@pytest.fixture(scope="module")
def gateway(upstream: tuple[Upstream, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    _, port = upstream
    registry = f"""include_defaults: false
models:
  - id: script
    modality: text
    backend: remote
    url: http://127.0.0.1:{port}/v1
    moderation: {{blocked_terms: ["{PHRASE}"], holdback_chars: 16}}
"""
    gw = start_server(tmp_path_factory.mktemp("modgw"), "modgw", registry, {}, ready_path="/health/ready")
    yield gw
    stop_server(gw)


def complete(gw: Server, texts: list[str], chunk: int, stream: bool) -> tuple[dict[int, str], dict[int, str]]:
    """The text and finish reason of each choice, as the client saw them."""
    # base64, or input moderation would refuse the prompt that carries the phrase
    script = base64.b64encode(json.dumps({"texts": texts, "chunk": chunk}).encode()).decode()
    body = {"model": "script", "prompt": script, "n": len(texts),
            "max_tokens": 1000, "stream": stream}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    text: dict[int, str] = {}
    finish: dict[int, str] = {}
    if not stream:
        r = httpx.post(f"{gw.url}/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        for c in r.json()["choices"]:
            text[c["index"]], finish[c["index"]] = c["text"], c["finish_reason"]
        return text, finish
    with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        raw = "".join(r.iter_text())
    events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        for c in json.loads(e)["choices"]:
            text[c["index"]] = text.get(c["index"], "") + c["text"]
            if c["finish_reason"]:
                finish[c["index"]] = c["finish_reason"]
    return text, finish


def wait_for(cond: object, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_phrase_at_every_position_never_reaches_the_client(gateway: Server, upstream: tuple[Upstream, int],
                                                             stream: bool) -> None:
    up, _ = upstream
    leaked = blocked = 0
    positions = range(0, len(BASE) + 1, 1 if stream else 3)
    for p in positions:
        # a long tail (seconds of upstream time at a character a millisecond), so that an upstream still
        # streaming when the gate blocks shows whether the gateway stopped its request
        text = BASE[:p] + " " + PHRASE + " " + BASE[p:] + CLEAN * 25
        before = len(up.finished)
        got, finish = complete(gateway, [text], 1, stream)
        leaked += len(got.get(0, "")) > p + 1  # a character of the phrase (or anything after it) went out
        blocked += finish.get(0) == "content_filter"
        assert text.startswith(got.get(0, ""))
        assert wait_for(lambda b=before: len(up.finished) > b)
        assert up.finished[before] is False  # the gateway closed the upstream stream: its request stopped
    assert leaked == 0
    assert blocked == len(positions)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8])
def test_n2_moderates_each_choice_alone(gateway: Server, chunk: int) -> None:
    leaked = 0
    for p in range(0, 40, 3):
        bad = CLEAN[:p] + " " + PHRASE + " " + CLEAN[p:]
        got, finish = complete(gateway, [bad, CLEAN], chunk, stream=True)
        leaked += len(got.get(0, "")) > p + 1
        assert finish == {0: "content_filter", 1: "stop"}
        assert got[1] == CLEAN  # the clean choice is delivered whole
    assert leaked == 0


def test_clean_text_passes_whole(gateway: Server) -> None:
    for stream in (True, False):
        got, finish = complete(gateway, [BASE + CLEAN], 1, stream)
        assert got[0] == BASE + CLEAN and finish[0] == "stop"


def test_coverage_metric_is_one(gateway: Server) -> None:
    complete(gateway, [BASE], 2, stream=True)
    checked = gateway.metric("genserve_moderation_chars_total", model_name="script", kind="checked")
    released = gateway.metric("genserve_moderation_chars_total", model_name="script", kind="released")
    assert released > 0 and checked == released
    assert gateway.metric("genserve_moderation_flags_total", model_name="script", category="blocked_term") > 0


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_choice_blocked_as_it_ends_keeps_the_upstreams_usage(gateway: Server, upstream: tuple[Upstream, int],
                                                               stream: bool) -> None:
    """The phrase in the last characters: the upstream has finished the choice (``stop``) when the gate's
    final check blocks it. Nothing needs stopping, so the gateway reads on to the upstream's own usage
    (prompt tokens included) instead of closing the stream and counting only the completion."""
    up, _ = upstream
    script = base64.b64encode(json.dumps({"texts": [BASE + PHRASE], "chunk": 1}).encode()).decode()
    body = {"model": "script", "prompt": script, "max_tokens": 1000, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    before = len(up.finished)
    if stream:
        with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, headers=headers, timeout=30) as r:
            events = [line[6:] for line in "".join(r.iter_text()).split("\n") if line.startswith("data: ")]
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["text"] for e in chunks for c in e["choices"])
        finish = [c["finish_reason"] for e in chunks for c in e["choices"] if c["finish_reason"]]
        usage = chunks[-1]["usage"]
    else:
        r = httpx.post(f"{gateway.url}/v1/completions", json=body, headers=headers, timeout=30)
        (choice,) = r.json()["choices"]
        text, finish, usage = choice["text"], [choice["finish_reason"]], r.json()["usage"]
    assert BASE.startswith(text) and finish == ["content_filter"]
    assert usage["prompt_tokens"] == 3 and usage["completion_tokens"] == len(BASE + PHRASE)  # the upstream's
    assert wait_for(lambda: len(up.finished) > before) and up.finished[before] is True
