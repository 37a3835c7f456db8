"""The embedded image models on a live server: the digit GAN, VAE and flow through generations and
latent interpolations."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tests.conftest import content

SERVER_SET = "image"

MODULES = ["genserve-gan", "genserve-vae", "genserve-flow"]


def post(server, path: str, **body):
    with server.client() as c:
        return c.post(path, json=body)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_openai_sdk_gets_a_digit_at_an_enlarged_size(openai_client):
    out = openai_client.images.generate(model="genserve-gan", prompt="5", size="64x64", response_format="b64_json",
                                        extra_body={"seed": 3})
    image = decode(out.data[0].b64_json)
    assert image.format == "PNG" and image.size == (64, 64)
    pixels = np.asarray(image).astype(int)
    assert np.array_equal(pixels[::8, ::8], pixels[7::8, 7::8]), "64x64 is the 8x8 digit, each pixel 8x8"
    assert pixels.max() > 200 and pixels.min() < 50  # light ink on a dark ground


def test_modules_list_their_sizes(server):
    r = post(server, "/v1/images/generations", model="genserve-vae", prompt="1", size="100x100")
    assert r.status_code == 400 and "8x8, 16x16, 32x32, 64x64" in r.json()["error"]["message"]


@pytest.mark.parametrize("model", MODULES)
def test_modules_draw_the_requested_digit_and_repeat_a_seed(server, model):
    body = {"model": model, "prompt": "7", "n": 3, "seed": 11, "size": "32x32"}
    first = post(server, "/v1/images/generations", **body).json()["data"]
    assert [decode(d["b64_json"]).size for d in first] == [(32, 32)] * 3
    again = post(server, "/v1/images/generations", **body).json()["data"]
    assert [content(d["b64_json"]) for d in first] == [content(d["b64_json"]) for d in again]


@pytest.mark.parametrize("model", MODULES)
def test_module_images_do_not_depend_on_their_batch(server, model):
    alone = post(server, "/v1/images/generations", model=model, prompt="3", seed=5).json()["data"][0]["b64_json"]
    with ThreadPoolExecutor(4) as pool:
        crowd = list(pool.map(lambda i: post(server, "/v1/images/generations", model=model,
                                             prompt="3" if i == 1 else str(i), seed=5 if i == 1 else i), range(4)))
    assert content(crowd[1].json()["data"][0]["b64_json"]) == content(alone)


@pytest.mark.parametrize("model", MODULES)
def test_interpolation_walks_from_one_seed_to_the_other(server, model):
    frames = post(server, "/v1/images/interpolations", model=model, seed_start=1, seed_end=2, frames=5,
                  method="slerp", **{"class": "4"}).json()["data"]
    assert len(frames) == 5
    ends = post(server, "/v1/images/generations", model=model, prompt="4", seed=1).json()["data"][0]["b64_json"]
    end = post(server, "/v1/images/generations", model=model, prompt="4", seed=2).json()["data"][0]["b64_json"]
    assert content(frames[0]["b64_json"]) == content(ends) and content(frames[-1]["b64_json"]) == content(end)
    gif = post(server, "/v1/images/interpolations", model=model, seed_start=1, seed_end=2, frames=6,
               format="gif", **{"class": "4"}).json()["data"]
    animation = decode(gif[0]["b64_json"])
    assert len(gif) == 1 and animation.format == "GIF" and animation.n_frames == 6


def test_interpolation_frames_come_at_the_size_asked_for(server):
    body = {"model": "genserve-gan", "seed_start": 1, "seed_end": 2, "frames": 3, "class": "4"}
    small = [np.asarray(decode(d["b64_json"])) for d in
             post(server, "/v1/images/interpolations", **body).json()["data"]]
    large = [np.asarray(decode(d["b64_json"])) for d in
             post(server, "/v1/images/interpolations", size="64x64", **body).json()["data"]]
    assert [f.shape[:2] for f in small] == [(8, 8)] * 3 and [f.shape[:2] for f in large] == [(64, 64)] * 3
    assert all(np.array_equal(b[::8, ::8], a) for a, b in zip(small, large, strict=True))
    gif = decode(post(server, "/v1/images/interpolations", size="32x32", format="gif", **body).json()["data"][0]
                 ["b64_json"])
    assert gif.size == (32, 32) and gif.n_frames == 3
    r = post(server, "/v1/images/interpolations", size="100x100", **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "size"
    assert "8x8, 16x16" in r.json()["error"]["message"]


def test_module_refuses_diffusion_knobs_and_unknown_classes(server):
    r = post(server, "/v1/images/generations", model="genserve-gan", prompt="7", num_inference_steps=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "num_inference_steps"
    r = post(server, "/v1/images/generations", model="genserve-gan", prompt="a cat")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "0, 1, 2" in r.json()["error"]["message"]
    r = post(server, "/v1/images/interpolations", model="tiny-sd", seed_start=1, seed_end=2)
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"
