"""The official OpenAI SDK against a live genserve: text, chat, embeddings, streaming, seeds."""

from __future__ import annotations

import base64
import math

import httpx
import numpy as np
import pytest
from transformers import AutoTokenizer

from tests.conftest import API_KEY, EMBED, TEXT, TEXT_DIR, Server, sdk

PROMPT = "The json module"
QUESTION = [{"role": "user", "content": "What does os.path.join do?"}]


def stream_text(stream) -> tuple[dict[int, str], dict[int, str], object]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, usage


def test_models_list(openai_client, server: Server) -> None:
    ids = {m.id for m in openai_client.models.list()}
    assert {TEXT, EMBED} <= ids
    cards = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]
    text = next(c for c in cards if c["id"] == TEXT)
    assert (text["modality"], text["tasks"], text["ready"], text["object"]) == (
        "text", ["completion", "chat"], True, "model")
    embed = openai_client.models.retrieve(EMBED)
    assert embed.id == EMBED and embed.model_extra["modality"] == "embedding"


def test_completion_and_its_stream_agree(openai_client) -> None:
    tok = AutoTokenizer.from_pretrained(TEXT_DIR)
    full = openai_client.completions.create(model=TEXT, prompt=PROMPT, max_tokens=12, temperature=0)
    assert full.object == "text_completion" and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens == len(tok(PROMPT)["input_ids"])
    assert 1 <= full.usage.completion_tokens <= 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    stream = openai_client.completions.create(model=TEXT, prompt=PROMPT, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
    texts, finish, usage = stream_text(stream)
    assert texts[0] == full.choices[0].text
    assert finish[0] == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens


def test_chat_and_its_stream_agree(openai_client) -> None:
    full = openai_client.chat.completions.create(model=TEXT, messages=QUESTION, max_completion_tokens=16,
                                                 temperature=0)
    msg = full.choices[0].message
    assert full.object == "chat.completion" and msg.role == "assistant" and msg.content
    chunks = list(openai_client.chat.completions.create(model=TEXT, messages=QUESTION, max_tokens=16,
                                                        temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_same_seed_same_output(openai_client) -> None:
    def run(seed: int) -> str:
        r = openai_client.completions.create(model=TEXT, prompt=PROMPT, max_tokens=24, temperature=1.0,
                                             seed=seed, extra_body={"ignore_eos": True})
        return r.choices[0].text

    first = run(1234)
    assert run(1234) == first
    assert run(4321) != first


def test_response_ids_are_unique_even_with_a_fixed_request_id(openai_client) -> None:
    ids = {openai_client.completions.create(model=TEXT, prompt="x", max_tokens=1,
                                            extra_headers={"x-request-id": "same"}).id for _ in range(3)}
    assert len(ids) == 3 and all(i.startswith("cmpl-") for i in ids)


def test_n_two(openai_client) -> None:
    r = openai_client.chat.completions.create(model=TEXT, messages=QUESTION, n=2, max_tokens=16, seed=3,
                                              temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    texts, finish, usage = stream_text(openai_client.chat.completions.create(
        model=TEXT, messages=QUESTION, n=2, max_tokens=16, seed=3, temperature=1.0, stream=True,
        stream_options={"include_usage": True}))
    assert texts == {0: r.choices[0].message.content, 1: r.choices[1].message.content}
    assert set(finish) == {0, 1}
    assert usage.completion_tokens == r.usage.completion_tokens


def test_prompt_list_numbers_choices_by_prompt(openai_client) -> None:
    single = [openai_client.completions.create(model=TEXT, prompt=p, max_tokens=6, temperature=0).choices[0].text
              for p in ("def main():", "import os")]
    r = openai_client.completions.create(model=TEXT, prompt=["def main():", "import os"], n=2, max_tokens=6,
                                         temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [single[0], single[0], single[1], single[1]]


def test_stop_sequences(openai_client) -> None:
    base = openai_client.completions.create(model=TEXT, prompt=PROMPT, max_tokens=40, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].text
    # A stop string from the middle of the greedy output, usually straddling two tokens.
    stop = base[len(base) // 2: len(base) // 2 + 3]
    expected = base[: base.index(stop)]
    r = openai_client.completions.create(model=TEXT, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "@@@"],
                                         extra_body={"ignore_eos": True})
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    texts, finish, _ = stream_text(openai_client.completions.create(
        model=TEXT, prompt=PROMPT, max_tokens=40, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True}))
    assert texts[0] == expected and finish[0] == "stop"


def test_logprobs(openai_client) -> None:
    r = openai_client.completions.create(model=TEXT, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                         extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and value <= 0
        assert math.isclose(value, max(top.values()), abs_tol=1e-5)  # greedy picks the most likely
    assert "".join(lp.tokens) == r.choices[0].text
    zero = openai_client.completions.create(model=TEXT, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=0)
    assert zero.choices[0].logprobs.token_logprobs == lp.token_logprobs[:3]
    texts = {}
    for chunk in openai_client.completions.create(model=TEXT, prompt=PROMPT, max_tokens=3, temperature=0,
                                                  logprobs=0, stream=True):
        texts.setdefault("lp", []).extend(chunk.choices[0].logprobs.token_logprobs if chunk.choices[0].logprobs
                                          else [])
    assert texts["lp"] == zero.choices[0].logprobs.token_logprobs
    c = openai_client.chat.completions.create(model=TEXT, messages=QUESTION, max_tokens=4, temperature=0,
                                              logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in content)


def test_embeddings(openai_client, server: Server) -> None:
    texts = ["a red apple", "an apple that is red", "the stock market fell sharply"]
    r = openai_client.embeddings.create(model=EMBED, input=texts, encoding_format="float")
    vecs = np.array([d.embedding for d in r.data])
    assert vecs.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.2
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0
    # Without encoding_format the SDK asks for base64 and decodes it itself, after validating: its
    # strict mode refuses the base64 string for List[float] (OpenAI's own answer too), so not strict here.
    default = sdk(server.url, strict=False).embeddings.create(model=EMBED, input=texts)
    assert np.allclose([d.embedding for d in default.data], vecs, atol=1e-5)
    # A raw caller gets both encodings.
    raw = httpx.post(f"{server.url}/v1/embeddings", headers={"Authorization": f"Bearer {API_KEY}"},
                     json={"model": EMBED, "input": texts[0], "encoding_format": "base64"}).json()
    assert isinstance(raw["data"][0]["embedding"], str)
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vecs[0], atol=1e-5)
    floats = httpx.post(f"{server.url}/v1/embeddings", headers={"Authorization": f"Bearer {API_KEY}"},
                        json={"model": EMBED, "input": texts[0]}).json()["data"][0]["embedding"]
    assert np.allclose(floats, vecs[0], atol=1e-5)


def test_transformers_greedy_equals_genserve(openai_client) -> None:
    """transformers loads the shipped directory unchanged, and its greedy continuation is ours (both
    in float32; the built-in entry computes in bfloat16 on CPUs that have it)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(TEXT_DIR)
    model = AutoModelForCausalLM.from_pretrained(TEXT_DIR, dtype=torch.float32).eval()
    for prompt in ("The json module", "def read_file(path):"):
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
        expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        got = openai_client.completions.create(model="tiny-fp32", prompt=prompt, max_tokens=24, temperature=0)
        assert got.choices[0].text == expected


@pytest.mark.parametrize("path", ["/v1/models", "/health/live"])
def test_request_id_header(server: Server, path: str) -> None:
    r = httpx.get(server.url + path, headers={"Authorization": f"Bearer {API_KEY}", "x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    odd = httpx.get(server.url + path, headers={"Authorization": f"Bearer {API_KEY}", "x-request-id": "a b<c>"})
    assert odd.headers["x-request-id"] != "a b<c>"  # replaced, never echoed
    assert len(httpx.get(server.url + path, headers={"Authorization": f"Bearer {API_KEY}"})
               .headers["x-request-id"]) == 32
