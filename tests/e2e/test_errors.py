"""Bad requests get the right 4xx with OpenAI's error body naming the parameter; never a 5xx."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import API_KEY, EMBED, TEXT, Server

C, CHAT, EMB = "/v1/completions", "/v1/chat/completions", "/v1/embeddings"
OK_C = {"model": TEXT, "prompt": "hello", "max_tokens": 2}
OK_CHAT = {"model": TEXT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
MSG = [{"role": "user", "content": "hi"}]

CASES = [
    # (name, path, body, status, param)
    ("max_tokens as string", C, {**OK_C, "max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens as bool", C, {**OK_C, "max_tokens": True}, 400, "max_tokens"),
    ("max_tokens zero", C, {**OK_C, "max_tokens": 0}, 400, "max_tokens"),
    ("temperature too high", C, {**OK_C, "temperature": 5}, 400, "temperature"),
    ("temperature as string", CHAT, {**OK_CHAT, "temperature": "hot"}, 400, "temperature"),
    ("top_p zero", C, {**OK_C, "top_p": 0}, 400, "top_p"),
    ("presence_penalty out of range", CHAT, {**OK_CHAT, "presence_penalty": 3}, 400, "presence_penalty"),
    ("n zero", C, {**OK_C, "n": 0}, 400, "n"),
    ("n above the model cap", C, {**OK_C, "n": 50}, 400, "n"),
    ("seed as string", C, {**OK_C, "seed": "1"}, 400, "seed"),
    ("stop as number", C, {**OK_C, "stop": 5}, 400, "stop"),
    ("too many stop strings", C, {**OK_C, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("empty stop string", CHAT, {**OK_CHAT, "stop": [""]}, 400, "stop"),
    ("logprobs above 5", C, {**OK_C, "logprobs": 6}, 400, "logprobs"),
    ("top_logprobs without logprobs", CHAT, {**OK_CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("top_logprobs above 20", CHAT, {**OK_CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("logit_bias key not a token id", C, {**OK_C, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("logit_bias key a non-ASCII digit", C, {**OK_C, "logit_bias": {"²": 1}}, 400, "logit_bias"),
    ("logit_bias key outside vocabulary", CHAT, {**OK_CHAT, "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ("echo unsupported", C, {**OK_C, "echo": True}, 400, "echo"),
    ("empty prompt list", C, {**OK_C, "prompt": []}, 400, "prompt"),
    ("too many prompts", C, {**OK_C, "prompt": ["x"] * 17}, 400, "prompt"),
    ("token id outside vocabulary", C, {**OK_C, "prompt": [1, 2, 999999]}, 400, "prompt"),
    ("prompt beyond context", C, {**OK_C, "prompt": "word " * 2000}, 400, "prompt"),
    ("prompt far beyond context", C, {**OK_C, "prompt": "x" * 900_000}, 400, "prompt"),
    ("max_tokens beyond context", C, {**OK_C, "max_tokens": 100000}, 400, "max_tokens"),
    ("messages beyond context", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "word " * 2000}]},
     400, "messages"),
    ("missing model", C, {"prompt": "hi"}, 400, "model"),
    ("missing messages", CHAT, {"model": TEXT}, 400, "messages"),
    ("empty messages", CHAT, {**OK_CHAT, "messages": []}, 400, "messages"),
    ("unknown role", CHAT, {**OK_CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("image content part", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400, "messages[0].content"),
    ("tools unsupported", CHAT, {**OK_CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tools"),
    ("json mode unsupported", CHAT, {**OK_CHAT, "response_format": {"type": "json_object"}}, 400,
     "response_format.type"),
    ("unknown model", C, {**OK_C, "model": "no-such-model"}, 404, "model"),
    ("chat on an embedding model", CHAT, {**OK_CHAT, "model": EMBED}, 400, "model"),
    ("embeddings on a text model", EMB, {"model": TEXT, "input": "x"}, 400, "model"),
    ("empty embedding input", EMB, {"model": EMBED, "input": []}, 400, "input"),
    ("empty embedding text", EMB, {"model": EMBED, "input": ["ok", ""]}, 400, "input"),
    ("empty token-id prompt", C, {**OK_C, "prompt": [[1, 2], []]}, 400, "prompt"),
    ("embedding input too long", EMB, {"model": EMBED, "input": "word " * 600}, 400, "input"),
    ("embedding dimensions", EMB, {"model": EMBED, "input": "x", "dimensions": 100}, 400, "dimensions"),
    ("embedding encoding_format", EMB, {"model": EMBED, "input": "x", "encoding_format": "int8"}, 400,
     "encoding_format"),
]


def assert_openai_error(r: httpx.Response, status: int, param: str | None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param), err
    assert "Traceback" not in r.text and "/work/" not in r.text and ".py" not in err["message"]
    assert r.headers["x-request-id"]


@pytest.mark.parametrize(("name", "path", "body", "status", "param"), CASES, ids=[c[0] for c in CASES])
def test_bad_request(server: Server, name: str, path: str, body: dict, status: int, param: str) -> None:
    with server.client() as client:
        assert_openai_error(client.post(path, json=body), status, param)


@pytest.mark.parametrize(("path", "body"), [(C, OK_C), (CHAT, OK_CHAT)])
def test_bad_request_with_stream_still_gets_status(server: Server, path: str, body: dict) -> None:
    with server.client() as client:
        r = client.post(path, json={**body, "max_tokens": 100000, "stream": True})
    assert_openai_error(r, 400, "max_tokens")


def test_hopeless_prompt_is_refused_before_tokenizing(server: Server) -> None:
    with server.client() as client:
        r = client.post(C, json={**OK_C, "prompt": "x" * 900_000})
    assert "characters is longer than that" in r.json()["error"]["message"]


def test_invalid_json(server: Server) -> None:
    with server.client() as client:
        r = client.post(C, content=b'{"model": ', headers={"content-type": "application/json"})
        assert_openai_error(r, 400, None)
        assert r.json()["error"]["code"] == "invalid_json"
        form = "application/x-www-form-urlencoded"  # what `curl -d` sends
        for content, ctype in ((b"[1, 2]", "application/json"), (b'{"model": "x"}', form)):
            r = client.post(C, content=content, headers={"content-type": ctype})
            assert_openai_error(r, 400, None)
            assert "must be a JSON object" in r.json()["error"]["message"]


def test_unknown_fields_are_ignored(server: Server) -> None:
    with server.client() as client:
        assert client.post(C, json={**OK_C, "some_future_field": {"x": 1}}).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"},
                                     {"Authorization": f"Bearer {API_KEY}x"}])
def test_missing_or_wrong_key(server: Server, headers: dict) -> None:
    r = httpx.post(server.url + C, json=OK_C, headers=headers)
    assert_openai_error(r, 401, None)
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", headers=headers).status_code == 401


def test_key_is_checked_before_the_body_is_read(server: Server) -> None:
    r = httpx.post(server.url + C, content=b'{"model": ', headers={"content-type": "application/json"})
    assert_openai_error(r, 401, None)
    assert r.headers["www-authenticate"] == "Bearer"


def test_oversized_body(server: Server) -> None:
    with server.client() as client:
        r = client.post(C, json={**OK_C, "prompt": "x" * (2 << 20)})
        assert_openai_error(r, 413, None)

        def chunks():  # no Content-Length: the cap applies while the body streams in
            yield b'{"model": "genserve-text-tiny", "prompt": "'
            for _ in range(40):
                yield b"x" * 65536
            yield b'"}'

        r = client.post(C, content=chunks(), headers={"content-type": "application/json"})
        assert_openai_error(r, 413, None)


def test_unknown_route(server: Server) -> None:
    with server.client() as client:
        assert_openai_error(client.get("/v1/nothing-here"), 404, None)


SURROGATE = "\ud800"
UNICODE_CASES = [
    # (path, body, param): a lone surrogate (JSON "\ud800") in each kind of text field is a 400 naming
    # the field, never a 500 from an encoder, a tokenizer or the error body itself.
    (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "hi " + SURROGATE}]}, "messages[0].content"),
    (C, {**OK_C, "prompt": ["fine", "x" + SURROGATE]}, "prompt"),
    (EMB, {"model": EMBED, "input": [SURROGATE]}, "input"),
    (C, {**OK_C, "model": "no-such-model" + SURROGATE}, "model"),
    ("/v1/molecules/properties", {"smiles": ["CCO", "CCO" + SURROGATE]}, "smiles"),
]


@pytest.mark.parametrize(("path", "body", "param"), UNICODE_CASES, ids=[c[2] for c in UNICODE_CASES])
def test_lone_surrogates_are_a_400_naming_the_field(server: Server, path: str, body: dict, param: str) -> None:
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as the JSON escape \ud800
    assert b"\\ud800" in raw
    with server.client() as client:
        r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400, param)
    assert "lone surrogate (U+D800)" in r.json()["error"]["message"]
    if param == "smiles":
        assert "of smiles[1]" in r.json()["error"]["message"]


@pytest.mark.parametrize("smiles", ["C" * 20000, "C" * 300, "C" + "(C" * 70 + ")" * 70, "C%11%12" * 110],
                         ids=["20000 atoms", "300 atoms", "branches 70 deep", "110 rings"])
def test_molecules_too_large_for_rdkit_are_refused_before_it_sees_them(server: Server, smiles: str) -> None:
    """A 20,000-atom chain crashed the whole server inside RDKit (stack overflow); now it is a 400."""
    with server.client() as client:
        r = client.post("/v1/molecules/properties", json={"smiles": ["CCO", smiles]})
        assert_openai_error(r, 400, "smiles[1]")
        assert "at most" in r.json()["error"]["message"]
        assert client.post("/v1/molecules/properties", json={"smiles": ["CCO"]}).json()["data"][0]["valid"]
    assert httpx.get(server.url + "/health/live").status_code == 200


@pytest.mark.parametrize("field", [{"temperature": 1e-45}, {"top_p": 1e-46}, {"temperature": 5e-324}])
def test_subnormal_sampling_parameters_are_greedy(server: Server, field: dict) -> None:
    """Dividing logits by a subnormal temperature gave NaN probabilities and a junk token; a top_p that
    float32 rounds to 0 kept no token at all. A subnormal temperature is now greedy, and such a top_p
    keeps the top token, as top_k=1 does (of the watermarked distribution: the draw is still a draw)."""
    body = {**OK_C, "prompt": "The json module", "max_tokens": 12}
    top = {"temperature": 0} if "temperature" in field else {"top_k": 1, "seed": 3}
    with server.client() as client:
        expected = client.post(C, json={**body, **top}).json()["choices"][0]["text"]
        tiny = client.post(C, json={**body, **field, "seed": 3})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == expected


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/audio/music", {"model": "genserve-music", "temperature": 5e-324}),
    ("/v1/molecules/generations", {"model": "genserve-mol", "temperature": 1e-45})])
def test_a_subnormal_temperature_without_a_greedy_mode_is_a_400(server: Server, path: str, body: dict) -> None:
    """Music's sampler raised inside torch.multinomial on 5e-324 and failed its whole batch."""
    with server.client() as client:
        assert_openai_error(client.post(path, json=body), 400, "temperature")
