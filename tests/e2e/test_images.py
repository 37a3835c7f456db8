"""``/v1/images/*`` on a live server, through a Stable Diffusion pipeline that the fixture builds
with random weights and saves as diffusers does (``tiny-sd``: the generic ``diffusers`` family)."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from genserve.models.seeding import item_seed
from tests.conftest import content, sdk

SERVER_SET = "image"

SD = "tiny-sd"
SIZE = 16  # tiny-sd: 8x8 latents, a VAE that doubles them


def generate(server, **body) -> httpx.Response:
    with server.client() as c:
        return c.post("/v1/images/generations", json={"model": SD, "prompt": "red apple", "num_inference_steps": 4,
                                                      **body})


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_openai_sdk_generates_pngs_at_the_requested_size(openai_client):
    out = openai_client.images.generate(model=SD, prompt="red apple", n=2, size=f"{SIZE}x{SIZE}",
                                        response_format="b64_json", extra_body={"num_inference_steps": 3, "seed": 1})
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in out.data]
    assert [(i.format, i.size, i.mode) for i in images] == [("PNG", (SIZE, SIZE), "RGB")] * 2
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1])), "image k uses seed + k"


def test_four_concurrent_same_seed_requests_are_batched_and_byte_identical_to_alone(server):
    body = {"seed": 1234, "guidance_scale": 5.0, "scheduler": "ddim"}
    alone = generate(server, **body).json()["data"][0]["b64_json"]
    before = server.metric("genserve_batch_size_count", model_name=SD)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: generate(server, **body), range(4)))
    batches = server.metric("genserve_batch_size_count", model_name=SD) - before
    assert [content(r.json()["data"][0]["b64_json"]) for r in results] == [content(alone)] * 4
    assert batches < 4, f"4 requests ran in {batches} batches: they must share forward passes"


def test_a_seeded_image_does_not_depend_on_its_batch_neighbours(server):
    alone = generate(server, seed=77, prompt="rocket").json()["data"][0]["b64_json"]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: generate(server, seed=77 if i == 2 else i, prompt="rocket" if i == 2
                                                   else f"prompt {i}"), range(4)))
    assert content(results[2].json()["data"][0]["b64_json"]) == content(alone)


def test_url_format_serves_the_png_without_a_key_until_it_is_gone(server):
    out = generate(server, seed=3, response_format="url").json()
    url = out["data"][0]["url"]
    r = httpx.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (SIZE, SIZE)
    missing = httpx.get(url[:-4] + "0000")
    assert missing.status_code == 404 and "expired" in missing.json()["error"]["message"]


def test_image_urls_never_take_the_requests_host(server):
    """The Host header (and X-Forwarded-Host from a loopback peer) was reflected into image URLs: anyone
    could make the server hand out links to a host of their choosing."""
    with server.client() as c:
        r = c.post("/v1/images/generations", json={"model": SD, "prompt": "red apple", "num_inference_steps": 2,
                                                   "response_format": "url"},
                   headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example",
                            "X-Forwarded-Proto": "https"})
    assert r.json()["data"][0]["url"].startswith(server.url + "/"), r.json()


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm++", "euler", "euler_a"])
def test_every_scheduler_by_name(server, scheduler):
    r = generate(server, seed=5, scheduler=scheduler)
    assert r.status_code == 200 and pixels(r.json()["data"][0]["b64_json"]).shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize(("body", "param", "text"), [
    ({"size": "1024x1024"}, "size", f"supported: {SIZE}x{SIZE}"),
    ({"size": "big"}, "size", ""),
    ({"n": 5}, "n", "limit of 4"),
    ({"num_inference_steps": 21}, "num_inference_steps", "limit of 20"),
    ({"scheduler": "heun"}, "scheduler", ""),
    ({"response_format": "png"}, "response_format", ""),
    ({"prompt": ""}, "prompt", ""),
])
def test_bad_generation_requests_get_400_naming_the_field(server, body, param, text):
    r = generate(server, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and text in r.json()["error"]["message"]


def test_a_molecule_model_is_not_an_image_model(server):
    with server.client() as c:
        r = c.post("/v1/images/generations", json={"model": "genserve-mol", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"


def test_stream_sends_each_denoising_step_then_the_images(server):
    with server.client() as c, c.stream("POST", "/v1/images/generations", json={
            "model": SD, "prompt": "cat face", "num_inference_steps": 5, "seed": 2, "stream": True,
            "stream_progress": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    steps = [e["step"] for e in parsed if e["type"] == "image_generation.progress"]
    assert steps == [1, 2, 3, 4, 5] and parsed[-1]["type"] == "image_generation.completed"
    done = parsed[-1]
    assert pixels(done["b64_json"]).shape == (SIZE, SIZE, 3) and done["size"] == f"{SIZE}x{SIZE}"
    assert done["output_format"] == "png" and done["seed"] == item_seed(2, 0) and done["provenance"]["c2pa"] is True


def test_openai_sdk_streams_images_as_openais_events(server, openai_client):
    """OpenAI's events only, as a client that validates every response strictly (the SDK's strict
    mode) reads them: one image_generation.completed per image, shaped as the SDK's
    ImageGenCompletedEvent; the same pixels as the unstreamed request. genserve's progress events come
    only when asked (``stream_progress``), before them."""
    from openai.types import ImageGenCompletedEvent

    events = list(openai_client.images.generate(model=SD, prompt="cat face", n=2, stream=True,
                                         extra_body={"seed": 4, "num_inference_steps": 3}))
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    completed = events
    # genserve's own progress events: a strict client refuses them, by design (they are opt-in).
    lenient = sdk(server.url, strict=False)
    progress = list(lenient.images.generate(model=SD, prompt="cat face", n=2, stream=True, extra_body={
        "seed": 4, "num_inference_steps": 3, "stream_progress": True}))
    assert [e.type for e in progress] == ["image_generation.progress"] * 3 + ["image_generation.completed"] * 2
    assert [content(e.b64_json) for e in progress[3:]] == [content(e.b64_json) for e in completed]
    for event in completed:
        ImageGenCompletedEvent.model_validate(event.model_dump(), strict=True)
        assert event.b64_json and event.size == f"{SIZE}x{SIZE}" and event.output_format == "png"
    whole = openai_client.images.generate(model=SD, prompt="cat face", n=2,
                                          extra_body={"seed": 4, "num_inference_steps": 3})
    assert [content(e.b64_json) for e in completed] == [content(d.b64_json) for d in whole.data]


def test_partial_images_are_refused_with_the_reason(server):
    r = generate(server, model=SD, prompt="cat face", stream=True, partial_images=2)
    assert r.status_code == 400 and r.json()["error"]["param"] == "partial_images"


def png_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def test_openai_sdk_edit_repaints_the_transparent_part_and_keeps_the_rest(openai_client):
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.full((SIZE, SIZE, 4), 255, dtype=np.uint8)
    mask[4:12, 4:12, 3] = 0  # transparent: repaint
    out = openai_client.images.edit(model=SD, image=("in.png", png_bytes(picture), "image/png"),
                                    mask=("mask.png", png_bytes(mask), "image/png"), prompt="rocket",
                                    response_format="b64_json", extra_body={"num_inference_steps": 3, "seed": 4})
    edited = pixels(out.data[0].b64_json)
    keep = mask[..., 3] == 255
    assert edited.shape == (SIZE, SIZE, 3)
    assert np.array_equal(edited[keep], picture[keep]) and not np.array_equal(edited[~keep], picture[~keep])


def edit(server, picture: bytes, mask: bytes | None = None, **fields) -> httpx.Response:
    files = {"image": ("a.png", picture)} | ({"mask": ("m.png", mask)} if mask is not None else {})
    with server.client() as c:
        return c.post("/v1/images/edits", data={"model": SD, "prompt": "red apple", "num_inference_steps": 4,
                                                **fields}, files=files)


def test_an_edit_without_mask_or_transparency_is_image_to_image(openai_client, server):
    picture = png_bytes(np.random.default_rng(2).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    out = openai_client.images.edit(model=SD, image=("in.png", picture, "image/png"), prompt="rocket",
                                    response_format="b64_json", extra_body={"num_inference_steps": 4, "seed": 4})
    assert pixels(out.data[0].b64_json).shape == (SIZE, SIZE, 3)
    light, heavy = (edit(server, picture, seed=4, strength=s).json()["data"][0]["b64_json"] for s in (0.3, 0.9))
    assert content(light) != content(heavy), "strength changes how much is redone"
    assert content(edit(server, picture, seed=4, strength=0.3).json()["data"][0]["b64_json"]) == content(light)


def test_an_opaque_mask_or_a_bad_strength_gets_a_400(server):
    picture = png_bytes(np.zeros((SIZE, SIZE, 3), dtype=np.uint8))
    opaque = png_bytes(np.full((SIZE, SIZE, 4), 255, dtype=np.uint8))
    r = edit(server, picture, opaque)
    assert r.status_code == 400 and r.json()["error"]["param"] == "mask" and "no transparent" in r.text
    r = edit(server, picture, strength=1.5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "strength"


def test_uploads_are_capped_before_decoding(server):
    huge = png_bytes(np.zeros((100, 100, 4), dtype=np.uint8))  # 10000 pixels > the entry's 4096
    noisy = png_bytes(np.random.default_rng(1).integers(0, 255, (120, 120, 4), dtype=np.uint8))  # > 20000 bytes
    with server.client() as c:
        r = c.post("/v1/images/edits", data={"model": SD, "prompt": "x"}, files={"image": ("a.png", huge)})
        assert r.status_code == 400 and "at most 4096 pixels" in r.json()["error"]["message"]
        r = c.post("/v1/images/edits", data={"model": SD, "prompt": "x"}, files={"image": ("a.png", noisy)})
        assert r.status_code == 413
        r = c.post("/v1/images/edits", data={"model": SD, "prompt": "x"}, files={"image": ("a.png", b"not a png")})
        assert r.status_code == 400 and r.json()["error"]["param"] == "image"


def test_image_metrics_count_images_and_steps(server):
    before = server.metric("genserve_images_total", model_name=SD)
    steps_before = server.metric("genserve_denoising_step_seconds_count", model_name=SD)
    generate(server, n=2, seed=9, num_inference_steps=3)
    assert server.metric("genserve_images_total", model_name=SD) - before == 2
    assert server.metric("genserve_denoising_step_seconds_count", model_name=SD) - steps_before == 3


THREAT = "a picture of how I am going to kill you tomorrow"


def test_image_prompts_are_moderated_at_every_image_endpoint(server):
    """Input moderation (default policy) on generations and edits: OpenAI's 400 naming `prompt`."""
    for r in (generate(server, prompt=THREAT),
              edit(server, png_bytes(np.zeros((SIZE, SIZE, 3), dtype=np.uint8)), prompt=THREAT)):
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "content_policy_violation",
                                                            "prompt")
    assert generate(server, prompt="a kill switch on a red apple").status_code == 200  # a benign look-alike


def test_a_flagged_image_refuses_the_response_and_no_byte_of_it_leaves(server):
    """tiny-sd-flagged: the policy's image checker flags every image (all concept thresholds at -1)."""
    before = server.metric("genserve_moderation_flags_total", model_name="tiny-sd-flagged", category="sexual")
    r = generate(server, model="tiny-sd-flagged", n=2)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("content_policy_violation", "prompt") and "b64_json" not in r.text
    with server.client() as c:
        r = c.post("/v1/images/generations", json={"model": "tiny-sd-flagged", "prompt": "red apple",
                                                    "num_inference_steps": 3, "stream": True})
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert "content_policy_violation" in events[-2] and events[-1] == "[DONE]"
    assert not any("b64_json" in e for e in events)
    after = server.metric("genserve_moderation_flags_total", model_name="tiny-sd-flagged", category="sexual")
    assert after >= before + 2  # one per request: the first flagged image ends it
