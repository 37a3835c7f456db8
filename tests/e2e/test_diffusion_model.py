"""The embedded text-to-image model, ``genserve-diffusion``, on a live server: the emoji a prompt
names, through the OpenAI SDK, alone or batched, inpainted and redrawn.

What a picture shows is judged by ``emoji-classifier`` (the instrument of ``genserve eval images``,
trained on every emoji): "recognisable" here means the classifier names the prompt's emoji first,
among all 1358."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from genserve.models.diffusion.train import SHOWCASE
from tests.conftest import content

SERVER_SET = "image"

MODEL = "genserve-diffusion"


@pytest.fixture(scope="module")
def name_of():
    from genserve.models.common.loading import weights_dir
    from genserve.models.diffusion.classifier import load_classifier, predict

    net = load_classifier(weights_dir() / "emoji-classifier")

    def top(image: np.ndarray, k: int = 1) -> list[str]:
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
        return [net.config.names[i] for i in predict(net, x)[1][0].topk(k).indices.tolist()]

    return top


@pytest.fixture(scope="module")
def emoji():
    from genserve.models.diffusion import data

    if not data.FONT.is_file():
        pytest.skip(f"needs the emoji font: {data.INSTALL_HINT}")
    emoji_set = data.load_emoji()
    return lambda name: emoji_set.images[emoji_set.index(name)].permute(1, 2, 0).numpy()  # (32, 32, 3) uint8


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def post(server, **body):
    with server.client() as c:
        return c.post("/v1/images/generations", json={"model": MODEL, **body})


@pytest.mark.parametrize("prompt", SHOWCASE)
def test_openai_sdk_draws_the_emoji_the_prompt_names(openai_client, name_of, prompt):
    out = openai_client.images.generate(model=MODEL, prompt=prompt, response_format="b64_json",
                                        extra_body={"seed": 0})  # the model's defaults: 32x32, its sampler
    image = decode(out.data[0].b64_json)
    assert image.shape == (32, 32, 3)
    assert name_of(image) == [prompt]


def test_larger_sizes_are_the_same_image_enlarged(openai_client):
    def get(size: str) -> np.ndarray:
        out = openai_client.images.generate(model=MODEL, prompt="rocket", size=size, response_format="b64_json",
                                            extra_body={"seed": 1, "num_inference_steps": 8})
        return decode(out.data[0].b64_json)

    small, large = get("32x32"), get("128x128")
    assert large.shape == (128, 128, 3) and np.array_equal(large[::4, ::4], small)


def test_four_concurrent_same_seed_requests_are_batched_and_equal_to_alone(server):
    body = {"prompt": "cat face", "seed": 21, "num_inference_steps": 10}
    alone = post(server, **body).json()["data"][0]["b64_json"]
    before = server.metric("genserve_batch_size_count", model_name=MODEL)
    with ThreadPoolExecutor(4) as pool:
        crowd = list(pool.map(lambda _: post(server, **body), range(4)))
    batches = server.metric("genserve_batch_size_count", model_name=MODEL) - before
    assert [content(r.json()["data"][0]["b64_json"]) for r in crowd] == [content(alone)] * 4
    assert batches < 4, f"4 requests ran in {batches} batches: they must share UNet passes"


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm++", "euler", "euler_a"])
def test_every_scheduler_by_name(server, scheduler):
    r = post(server, prompt="fire", seed=2, scheduler=scheduler, num_inference_steps=10)
    assert r.status_code == 200 and decode(r.json()["data"][0]["b64_json"]).shape == (32, 32, 3)


def test_unsupported_size_lists_the_supported_ones(server):
    r = post(server, prompt="rocket", size="512x512")
    assert r.status_code == 400 and "32x32, 64x64, 128x128, 256x256" in r.json()["error"]["message"]


@pytest.mark.parametrize("side", [32, 64, 128, 256])
def test_openai_sdk_inpaints_the_hole_and_keeps_the_rest_exactly_at_every_size(openai_client, emoji, side):
    """The model paints at 32x32; every pixel the mask keeps is still the caller's own at the output size
    (composited there, not at 32x32 and enlarged: that changed kept pixels by up to 21/255)."""
    k = side // 32
    picture = np.dstack([emoji("red apple"), np.full((32, 32), 255, np.uint8)]).repeat(k, 0).repeat(k, 1)
    picture[:, :, :3] = np.clip(picture[:, :, :3].astype(int) + np.arange(side)[:, None, None] % 3, 0, 255)
    picture[10 * k:22 * k - 1, 10 * k + 1:22 * k, 3] = 0  # transparent: repaint (edges off the 32x32 grid)
    out = openai_client.images.edit(model=MODEL, image=("apple.png", png(picture), "image/png"), prompt="red apple",
                                    size=f"{side}x{side}", response_format="b64_json",
                                    extra_body={"seed": 3, "num_inference_steps": 8})
    edited = decode(out.data[0].b64_json)
    keep = picture[..., 3] == 255
    assert edited.shape == (side, side, 3)
    assert np.array_equal(edited[keep], picture[..., :3][keep])
    assert not np.array_equal(edited[~keep], picture[..., :3][~keep])


def test_edits_take_png_jpeg_webp_in_the_outputs_shape_and_nothing_else(server, emoji):
    def send(data: bytes, **form):
        with server.client() as c:
            return c.post("/v1/images/edits", data={"model": MODEL, "prompt": "red apple", "seed": "1",
                                                    "num_inference_steps": "2", **form},
                          files={"image": ("in", data)})

    def encoded(array: np.ndarray, fmt: str) -> bytes:
        out = io.BytesIO()
        Image.fromarray(array).save(out, format=fmt)
        return out.getvalue()

    apple = emoji("red apple")
    for fmt in ("PNG", "JPEG", "WEBP"):
        assert send(encoded(apple, fmt)).status_code == 200, fmt
    for fmt in ("BMP", "GIF", "TIFF"):
        r = send(encoded(apple, fmt))
        assert r.status_code == 400 and r.json()["error"] == {
            "message": "image is not a PNG, JPEG or WebP image.", "type": "invalid_request_error",
            "param": "image", "code": None}, fmt
    wide = np.zeros((200, 300, 3), np.uint8)  # never silently squashed into the square output
    r = send(encoded(wide, "PNG"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    assert r.json()["error"]["message"].startswith("image is 300x200 but the output is 32x32: genserve neither "
                                                   "crops nor stretches, so the image must have the output's aspect "
                                                   "ratio (1:1)")
    assert send(encoded(np.zeros((64, 64, 3), np.uint8), "PNG"), size="128x128").status_code == 200  # same shape


def test_image_to_image_redoes_as_much_as_strength_says(openai_client, emoji, name_of):
    source = emoji("cat face")

    def redraw(prompt: str, strength: float) -> np.ndarray:
        out = openai_client.images.edit(model=MODEL, image=("cat.png", png(source), "image/png"), prompt=prompt,
                                        response_format="b64_json", extra_body={"seed": 4, "strength": strength})
        return decode(out.data[0].b64_json)

    distance = {s: np.abs(redraw("rocket", s).astype(int) - source).mean() for s in (0.1, 0.5, 1.0)}
    assert distance[0.1] < distance[0.5] < distance[1.0], distance
    assert name_of(redraw("rocket", 1.0)) == ["rocket"], "strength 1 ignores the image"
    assert name_of(redraw("cat face", 0.5)) == ["cat face"], "redrawn toward its own name, the cat stays"


def _steps(server) -> float:
    """Denoising steps the server has made (its denoising-step histogram's count)."""
    return server.metric("genserve_denoising_step_seconds_count", model_name=MODEL)


def _steps_once_settled(server) -> float:
    """The step count once it has not moved for 2 s (a step of these batches takes a fraction of that), within
    30 s."""
    import time

    done, changed, deadline = _steps(server), time.monotonic(), time.monotonic() + 30
    while time.monotonic() - changed < 2.0:
        assert time.monotonic() < deadline, "the denoising steps did not stop"
        time.sleep(0.25)
        if (now := _steps(server)) != done:
            done, changed = now, time.monotonic()
    return done


def test_a_streamed_client_that_leaves_stops_the_denoising(server) -> None:
    """Denoising went on for 66 s (146 steps) after a streamed client left; now the batch stops at its
    next step. The step counter is the server's own."""
    import httpx

    from tests.conftest import API_KEY

    before = _steps(server)
    body = {"model": MODEL, "prompt": "rocket", "n": 8, "num_inference_steps": 200, "stream": True,
            "stream_progress": True, "seed": 1}
    seen = 0
    with httpx.stream("POST", server.url + "/v1/images/generations", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        for line in r.iter_lines():
            if '"image_generation.progress"' in line:
                seen += 1
                if seen == 3:
                    break  # leaving the block closes the connection after the third step's event
    ran = _steps_once_settled(server) - before
    assert ran < 200, "the batch ran to the end after its client left"
    # The steps the server had made before it noticed (its events are sent as the steps end), plus the
    # one running then; a small constant, not the 197 left.
    assert ran <= seen + 3, f"{ran} steps ran for a client that left after {seen}"


def test_a_client_that_leaves_a_stream_without_progress_stops_the_denoising(server) -> None:
    """The same without ``stream_progress``: nothing is sent until the images are done, so the server
    learns of the departure from the connection alone. The client leaves once the server's own step
    counter shows 3 steps of its 200; the batch stops within a few steps of that."""
    import time

    import httpx

    from tests.conftest import API_KEY

    before = _steps(server)
    body = {"model": MODEL, "prompt": "rocket", "n": 8, "num_inference_steps": 200, "stream": True, "seed": 2}
    with httpx.stream("POST", server.url + "/v1/images/generations", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        deadline = time.monotonic() + 30
        while (left_at := _steps(server) - before) < 3:
            assert time.monotonic() < deadline, "the denoising did not start"
            time.sleep(0.02)
    ran = _steps_once_settled(server) - before
    assert ran < 200, "the batch ran to the end after its client left"
    assert ran <= left_at + 3, f"{ran} steps ran for a client that left after {left_at}"


def test_the_servers_log_has_no_library_chatter(server):
    """Loading diffusers pipelines, transformers and sentence-transformers models prints progress bars
    and deprecation warnings unless the server quiets them (app/logs.py): none reach the log."""
    log = server.log.read_text()
    assert "genserve-diffusion ready" in log
    for chatter in ("Loading pipeline components", "it/s]", "FutureWarning", "UserWarning", "DeprecationWarning"):
        assert chatter not in log, chatter
