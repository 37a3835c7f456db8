"""``POST /v1/moderations`` with the official SDK (strict response validation), and input blocks.

Input blocks answer OpenAI's 400: ``invalid_request_error`` / ``content_policy_violation`` naming the
field; the text endpoints are here, the image, audio and molecule ones beside their other tests.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from openai import BadRequestError, OpenAI
from PIL import Image

from genserve.app.moderation.categories import CATEGORIES
from tests.conftest import TEXT, Server, sdk

THREAT = "I am going to kill you tomorrow, you will not see it coming."
BENIGN = "How do I kill a Python process that hangs?"


@pytest.fixture(scope="module")
def strict(server: Server) -> OpenAI:
    return sdk(server.url)


def png_data_url(color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), color, dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_moderations_create_with_a_string(strict: OpenAI) -> None:
    r = strict.moderations.create(input=THREAT)
    assert r.model == "genserve-moderation" and len(r.results) == 1
    res = r.results[0]
    assert res.flagged and res.categories.harassment_threatening
    scores = res.category_scores.model_dump(by_alias=True)
    assert set(scores) == set(CATEGORIES)
    assert res.category_applied_input_types.model_dump(by_alias=True)["violence"] == ["text"]


def test_moderations_create_with_an_array_keeps_order(strict: OpenAI) -> None:
    r = strict.moderations.create(model="genserve-moderation", input=[BENIGN, THREAT, "Lovely weather today."])
    assert [x.flagged for x in r.results] == [False, True, False]


def test_moderations_create_with_an_image_part(strict: OpenAI) -> None:
    r = strict.moderations.create(input=[{"type": "text", "text": BENIGN},
                                         {"type": "image_url", "image_url": {"url": png_data_url((0, 90, 0))}}])
    assert len(r.results) == 1  # one multimodal input, one result (as OpenAI answers)
    types = r.results[0].category_applied_input_types.model_dump(by_alias=True)
    assert types["harassment"] == ["text"]  # no image checker configured: nothing applied to the image
    assert not r.results[0].flagged


def test_moderations_refuse_what_they_cannot_read(server: Server) -> None:
    with server.client() as c:
        r = c.post("/v1/moderations", json={"input": [{"type": "image_url", "image_url": {
            "url": "https://example.com/cat.png"}}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input[0].image_url.url"
        r = c.post("/v1/moderations", json={"input": "x", "model": TEXT})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"


def test_moderation_model_is_listed(server: Server) -> None:
    with server.client() as c:
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert models["genserve-moderation"]["modality"] == "moderation"
    assert models["genserve-moderation"]["tasks"] == ["moderation"]


def test_chat_input_block_names_the_message(strict: OpenAI) -> None:
    with pytest.raises(BadRequestError) as exc:
        strict.chat.completions.create(model=TEXT, max_tokens=4, messages=[
            {"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Sure."},
            {"role": "user", "content": THREAT}])
    err = exc.value.body
    assert err["code"] == "content_policy_violation" and err["type"] == "invalid_request_error"  # type: ignore[index]
    assert err["param"] == "messages[2].content"  # type: ignore[index]


def test_completion_input_block_names_the_prompt(strict: OpenAI) -> None:
    with pytest.raises(BadRequestError) as exc:
        strict.completions.create(model=TEXT, max_tokens=4, prompt=["Once upon a time", THREAT])
    assert exc.value.body["param"] == "prompt[1]"  # type: ignore[index]
    ok = strict.completions.create(model=TEXT, max_tokens=4, prompt=BENIGN)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_input_flags_are_counted(server: Server) -> None:
    before = server.metric("genserve_moderation_flags_total", model_name=TEXT, direction="input")
    with server.client() as c:
        assert c.post("/v1/completions", json={"model": TEXT, "prompt": THREAT, "max_tokens": 2}).status_code == 400
    after = server.metric("genserve_moderation_flags_total", model_name=TEXT, direction="input")
    assert after > before
    key_id = "key-1"  # the name of the first key given alone (docs/keys.md): never derived from the key
    lines = [json.loads(line[line.index("{"):]) for line in server.log.read_text().splitlines()
             if "moderation_flag" in line and '"input"' in line]
    assert any(x["key_id"] == key_id and x["model"] == TEXT and "harassment/threatening" in x["categories"]
               for x in lines)
    assert not any("content" in x for x in lines)  # the text only with log_content
