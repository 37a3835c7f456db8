"""A gateway routes to a second genserve process through the ``remote`` backend."""

from __future__ import annotations

import httpx
import numpy as np
from openai import OpenAI

from tests import conftest
from tests.conftest import EMBED, TEXT, Server
from tests.e2e.test_errors import assert_openai_error
from tests.e2e.test_openai_sdk import QUESTION, stream_text


def sdk(server: Server) -> OpenAI:
    return conftest.sdk(server.url)


def test_chat_through_gateway_equals_direct(server: Server, gateway: Server) -> None:
    kw = {"messages": QUESTION, "max_tokens": 16, "temperature": 0.8, "seed": 11, "n": 2}
    direct = sdk(server).chat.completions.create(model=TEXT, **kw)
    routed = sdk(gateway).chat.completions.create(model="remote-text", **kw)
    assert routed.model == "remote-text"
    assert [c.message.content for c in routed.choices] == [c.message.content for c in direct.choices]
    assert routed.usage.completion_tokens == direct.usage.completion_tokens
    # The gateway meters remote work from the events it relays.
    assert gateway.metric("genserve_request_success_total", model_name="remote-text") >= 2
    assert gateway.metric("genserve_generation_tokens_total", model_name="remote-text") >= \
        routed.usage.completion_tokens
    assert gateway.metric("genserve_request_success_total", model_name="remote-text", finished_reason="abort") == 0


def test_streaming_through_gateway(server: Server, gateway: Server) -> None:
    kw = {"prompt": "The json module", "max_tokens": 20, "temperature": 0, "logprobs": 2}
    direct = sdk(server).completions.create(model=TEXT, **kw)
    texts, finish, usage = stream_text(sdk(gateway).completions.create(
        model="remote-text", stream=True, stream_options={"include_usage": True}, **kw))
    assert texts[0] == direct.choices[0].text
    assert finish[0] == direct.choices[0].finish_reason
    assert usage.completion_tokens == direct.usage.completion_tokens
    routed = sdk(gateway).completions.create(model="remote-text", **kw)
    assert routed.choices[0].logprobs.tokens == direct.choices[0].logprobs.tokens


def test_chat_stream_through_gateway(server: Server, gateway: Server) -> None:
    kw = {"messages": QUESTION, "max_tokens": 12, "temperature": 0}
    direct = sdk(server).chat.completions.create(model=TEXT, **kw).choices[0].message.content
    texts, _, _ = stream_text(sdk(gateway).chat.completions.create(model="remote-text", stream=True, **kw))
    assert texts[0] == direct


def test_embeddings_through_gateway(server: Server, gateway: Server) -> None:
    # encoding_format="float": the SDK's strict mode refuses its own default, base64 (test_openai_sdk.py).
    direct = sdk(server).embeddings.create(model=EMBED, input=["red apple", "green pear"], encoding_format="float")
    routed = sdk(gateway).embeddings.create(model="remote-embed", input=["red apple", "green pear"],
                                           encoding_format="float")
    assert np.allclose([d.embedding for d in routed.data], [d.embedding for d in direct.data], atol=1e-6)


def test_upstream_errors_pass_through(gateway: Server) -> None:
    with gateway.client() as client:
        r = client.post("/v1/completions", json={"model": "remote-text", "prompt": "hi", "max_tokens": 100000})
        assert_openai_error(r, 400, "max_tokens")
        r = client.post("/v1/completions", json={"model": "remote-missing", "prompt": "hi"})
        assert_openai_error(r, 404, "model")
        r = client.post("/v1/chat/completions", json={"model": "remote-text", "stream": True,
                                                      "messages": [{"role": "user", "content": "w " * 3000}]})
        assert_openai_error(r, 400, "messages")


def test_models_list_reports_upstream_readiness(gateway: Server) -> None:
    with gateway.client() as client:
        cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
        assert cards["remote-text"]["ready"] is True and cards["remote-dead"]["ready"] is False
        assert client.get("/v1/models/remote-dead").json()["ready"] is False


def test_unreachable_upstream_is_503_and_not_ready(gateway: Server) -> None:
    with gateway.client() as client:
        r = client.post("/v1/completions", json={"model": "remote-dead", "prompt": "hi"})
    assert_openai_error(r, 503, None)
    ready = httpx.get(gateway.url + "/health/ready")
    assert ready.status_code == 503
    assert ready.json()["models"] == {"remote-text": True, "remote-embed": True, "remote-missing": True,
                                      "remote-dead": False}
