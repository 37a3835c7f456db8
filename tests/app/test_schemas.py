"""The request schemas' types, as the OpenAPI document states them (app/schemas/base.py)."""

from __future__ import annotations

import pytest


def test_integers_take_integral_floats_and_nothing_else() -> None:
    """JSON Schema (the OpenAPI document's language) counts 1.0 as an integer, so the server does too, in
    lists of token ids as well; 1.5, "1" and true stay 400s, as OpenAI's strict types have them."""
    from pydantic import ValidationError

    from genserve.app.schemas.chat import ChatCompletionRequest
    from genserve.app.schemas.completions import CompletionRequest

    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    ok = ChatCompletionRequest.model_validate({**base, "n": 2.0, "seed": -3.0, "max_tokens": 8.0})
    assert (ok.n, ok.seed, ok.max_tokens) == (2, -3, 8) and type(ok.n) is int
    assert ChatCompletionRequest.model_validate({**base, "temperature": 1}).temperature == 1.0
    for bad in (1.5, "1", True, float("inf")):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({**base, "n": bad})
    assert CompletionRequest.model_validate({"model": "m", "prompt": [[1.0, 2.0], [3.0]]}).prompt == [[1, 2], [3]]
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": [1.0, 2.5]})


def test_a_seed_the_server_draws_is_one_a_caller_may_send_back() -> None:
    """A request without a seed reports the one drawn for it, so that the caller can repeat the result: it
    must be a seed the API accepts (within the integers JSON keeps exactly), item offsets included."""
    from pydantic import TypeAdapter

    from genserve.app.schemas.base import Seed
    from genserve.models.seeding import MAX_REQUEST_SEED, item_seed, random_seed

    seeds = TypeAdapter(Seed)
    for _ in range(200):
        drawn = random_seed()
        assert seeds.validate_python(item_seed(drawn, 9)) == drawn + 9
    with pytest.raises(ValueError):
        seeds.validate_python(MAX_REQUEST_SEED + 1)


@pytest.mark.parametrize("seed", [-1, 0, 7, -(2**53 - 1), 2**53 - 1])
def test_an_items_seed_is_one_a_caller_may_send_back(seed: int) -> None:
    """Image k of a request reports seed + k, and a gateway forwards it to its upstream: it stays within
    the API's seeds, wrapping at the ends, and is seed + k wherever that is within them."""
    from pydantic import TypeAdapter

    from genserve.app.schemas.base import Seed
    from genserve.models.seeding import MAX_REQUEST_SEED, item_seed

    for k in range(4):
        s = item_seed(seed, k)
        assert TypeAdapter(Seed).validate_python(s) == s
        if abs(seed + k) <= MAX_REQUEST_SEED:
            assert s == seed + k


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "hi", "stream": False, "stream_options": {"include_usage": True}},
     "stream_options"),
    ("/v1/images/generations", {"prompt": "a cat", "stream_progress": True}, "stream_progress"),
])
def test_a_stream_only_field_without_stream_is_a_400_naming_it(path: str, body: dict, param: str) -> None:
    """As OpenAI answers ``stream_options`` without ``stream``, instead of a setting silently ignored;
    the same fields with ``stream: true``, or left null or false, are taken."""
    from fastapi.testclient import TestClient

    from genserve.app.main import create_app
    from genserve.app.settings import Settings

    with TestClient(create_app(Settings(api_keys=["k"]), entries=[])) as client:
        headers = {"Authorization": "Bearer k"}
        r = client.post(path, json={"model": "m", **body}, headers=headers)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and "only allowed when 'stream' is true" in error["message"]
        for taken in ({**body, "stream": True}, {**body, param: None if param == "stream_options" else False}):
            r = client.post(path, json={"model": "m", **taken}, headers=headers)
            assert r.status_code == 404 and r.json()["error"]["param"] == "model", r.text  # past validation
