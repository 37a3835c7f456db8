"""A gateway whose models are all ``remote`` fronts a second genserve for images, audio and molecules
(text and embeddings: ``test_remote.py``): seeded requests give the bytes the upstream gives
directly, streams included, and the upstream's errors come back as it sent them."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import API_KEY, Server, ServerSets, content, free_port, start_server, stop_server
from tests.e2e.test_errors import assert_openai_error

Upstreams = dict[str, Server]  # set name: its server
UPSTREAM_SETS = ("image", "audio", "molecule")  # the upstream servers (tests/conftest.py's model sets)
UPSTREAM = {  # gateway id: (upstream set, upstream id, modality, tasks)
    "remote-diffusion": ("image", "genserve-diffusion", "image", "[generation, edit]"),
    "remote-gan": ("image", "genserve-gan", "image", "[generation, interpolation]"),
    "remote-speech": ("audio", "genserve-speech", "audio", "[speech]"),
    "remote-music": ("audio", "genserve-music", "audio", "[music]"),
    "remote-mol": ("molecule", "genserve-mol", "molecule", "[generation]"),
    "remote-mol-vae": ("molecule", "genserve-mol-vae", "molecule", "[interpolation]"),
}


@pytest.fixture(scope="module")
def upstreams(server_sets: ServerSets) -> Upstreams:
    return {name: server_sets.get(name) for name in UPSTREAM_SETS}


@pytest.fixture(scope="module")
def media_gateway(upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    entries = "".join(f"""  - id: {mid}
    modality: {modality}
    backend: remote
    url: {upstreams[upstream_set].url}/v1
    upstream_model: {upstream}
    api_key_env: TEST_UPSTREAM_KEY
    tasks: {tasks}
""" for mid, (upstream_set, upstream, modality, tasks) in UPSTREAM.items())
    gw = start_server(tmp_path_factory.mktemp("media-gateway"), "media-gateway",
                      "include_defaults: false\nmodels:\n" + entries, {"TEST_UPSTREAM_KEY": API_KEY})
    yield gw
    stop_server(gw)


def both(upstreams: Upstreams, gateway: Server, path: str, body: dict,
         **kw) -> tuple[httpx.Response, httpx.Response]:
    """The same request to the upstream directly and through the gateway (its model id swapped)."""
    gateway_id, upstream_set = next((mid, up_set) for mid, (up_set, upstream, _, _) in UPSTREAM.items()
                                    if upstream == body["model"])
    server = upstreams[upstream_set]
    with server.client() as direct, gateway.client() as routed:
        a = direct.post(path, json=body, **kw)
        b = routed.post(path, json={**body, "model": gateway_id}, **kw)
    assert a.status_code == 200, a.text
    assert b.status_code == 200, b.text
    return a, b


def signed_by(data: bytes, media_type: str) -> str | None:
    """The model a file's C2PA manifest says made it (c2pa-python's Reader)."""
    import c2pa

    with c2pa.Reader(media_type, io.BytesIO(data)) as reader:
        store = json.loads(reader.json())
    actions = store["manifests"][store["active_manifest"]]["assertions"][0]["data"]["actions"]
    return actions[0]["parameters"]["model"]


def test_images_through_the_gateway_are_the_upstreams_bytes(upstreams: Upstreams, media_gateway: Server) -> None:
    body = {"model": "genserve-diffusion", "prompt": "red apple", "n": 2, "seed": 5, "num_inference_steps": 6,
            "size": "64x64"}
    direct, routed = both(upstreams, media_gateway, "/v1/images/generations", body)
    assert [content(d["b64_json"]) for d in routed.json()["data"]] == [content(d["b64_json"])
                                                                       for d in direct.json()["data"]]
    assert [d["seed"] for d in routed.json()["data"]] == [5, 6]
    # the upstream's own bytes: its content credentials name its model; the gateway claims nothing of its own
    assert signed_by(base64.b64decode(routed.json()["data"][0]["b64_json"]), "image/png") == "genserve-diffusion"
    p = routed.json()["provenance"]
    assert p["model"] == "remote-diffusion" and p["c2pa"] is False and "remote" in p["reason"]
    gan = {"model": "genserve-gan", "prompt": "7", "n": 3, "seed": 1, "size": "32x32"}
    direct, routed = both(upstreams, media_gateway, "/v1/images/generations", gan)
    assert [content(d["b64_json"]) for d in routed.json()["data"]] == [content(d["b64_json"])
                                                                       for d in direct.json()["data"]]


def test_streamed_images_through_the_gateway(upstreams: Upstreams, media_gateway: Server) -> None:
    body = {"model": "remote-diffusion", "prompt": "rocket", "seed": 3, "num_inference_steps": 4, "stream": True,
            "stream_progress": True}
    with media_gateway.client() as client:
        r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[5:]) for line in r.text.splitlines()
              if line.startswith("data:") and line[5:].strip() != "[DONE]"]
    assert [e["step"] for e in events if e["type"] == "image_generation.progress"] == [1, 2, 3, 4]
    completed = events[-1]
    assert completed["type"] == "image_generation.completed" and completed["provenance"]["model"] == "remote-diffusion"
    with upstreams["image"].client() as client:
        direct = client.post("/v1/images/generations", json={**body, "model": "genserve-diffusion",
                                                              "stream": False, "stream_progress": False}).json()
    assert content(completed["b64_json"]) == content(direct["data"][0]["b64_json"])


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_edits_through_the_gateway(upstreams: Upstreams, media_gateway: Server) -> None:
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[8:24, 8:24, 3] = 0  # the hole to repaint
    fields = {"prompt": "red apple", "seed": "9", "num_inference_steps": "4"}
    files = {"image": ("apple.png", _png(rgba), "image/png")}
    with upstreams["image"].client() as direct, media_gateway.client() as routed:
        a = direct.post("/v1/images/edits", data={**fields, "model": "genserve-diffusion"}, files=files)
        b = routed.post("/v1/images/edits", data={**fields, "model": "remote-diffusion"}, files=files)
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    assert content(b.json()["data"][0]["b64_json"]) == content(a.json()["data"][0]["b64_json"])


def test_interpolation_through_the_gateway(upstreams: Upstreams, media_gateway: Server) -> None:
    body = {"model": "genserve-gan", "seed_start": 1, "seed_end": 2, "frames": 4, "format": "gif", "class": "3"}
    direct, routed = both(upstreams, media_gateway, "/v1/images/interpolations", body)
    assert content(routed.json()["data"][0]["b64_json"]) == content(direct.json()["data"][0]["b64_json"])
    assert base64.b64decode(routed.json()["data"][0]["b64_json"])[:6] == b"GIF89a"


def test_speech_through_the_gateway_streams_the_upstreams_bytes(upstreams: Upstreams, media_gateway: Server) -> None:
    for fmt in ("wav", "mp3"):
        body = {"model": "genserve-speech", "input": "Hello from the gateway.", "voice": "alloy",
                "response_format": fmt}
        direct, routed = both(upstreams, media_gateway, "/v1/audio/speech", body)
        assert routed.content == direct.content and len(routed.content) > 1000
        assert routed.headers["content-type"] == direct.headers["content-type"]


def test_music_through_the_gateway(upstreams: Upstreams, media_gateway: Server) -> None:
    for fmt in ("wav", "mid"):
        body = {"model": "genserve-music", "seconds": 3, "key": "D major", "seed": 7, "response_format": fmt}
        direct, routed = both(upstreams, media_gateway, "/v1/audio/music", body)
        same = content if fmt == "wav" else bytes  # a WAV's C2PA manifest differs per response; MIDI has none
        assert same(routed.content) == same(direct.content)
        assert routed.headers["content-type"] == direct.headers["content-type"]
        assert routed.headers["x-genserve-seed"] == "7"


def test_molecules_through_the_gateway(upstreams: Upstreams, media_gateway: Server) -> None:
    body = {"model": "genserve-mol", "n": 8, "seed": 7, "constraints": {"qed_min": 0.5},
            "include": ["properties"]}
    direct, routed = both(upstreams, media_gateway, "/v1/molecules/generations", body)
    assert routed.json()["data"] == direct.json()["data"]
    assert routed.json()["stats"] == direct.json()["stats"]
    assert routed.json()["usage"] == direct.json()["usage"]
    path = {"model": "genserve-mol-vae", "start": "CCO", "end": "c1ccccc1O", "steps": 5, "include": ["properties"]}
    direct, routed = both(upstreams, media_gateway, "/v1/molecules/interpolations", path)
    assert routed.json()["data"] == direct.json()["data"]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/images/generations", {"model": "remote-diffusion", "prompt": "x", "size": "48x48"}, "size"),
    ("/v1/images/generations", {"model": "remote-gan", "prompt": "eleven"}, "prompt"),
    ("/v1/images/generations", {"model": "remote-gan", "prompt": "7", "stream": True}, "stream"),
    ("/v1/audio/speech", {"model": "remote-speech", "input": "hi", "voice": "no-such-voice"}, "voice"),
    ("/v1/audio/music", {"model": "remote-music", "key": "H major"}, "key"),
    ("/v1/molecules/generations", {"model": "remote-mol", "constraints": {"substructure": "[[C"}},
     "constraints.substructure"),
    ("/v1/molecules/interpolations", {"model": "remote-mol-vae", "start": "not a molecule", "end": "CCO"}, "start"),
])
def test_upstream_errors_pass_through(media_gateway: Server, path: str, body: dict, param: str) -> None:
    with media_gateway.client() as routed:
        r = routed.post(path, json=body)
    assert_openai_error(r, 400, param)


def test_a_remote_entry_pointing_at_its_own_server_is_one_request(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Readiness of an entry whose upstream is this very server: single-flight and no recursion. (The
    digit GAN as the local model: it loads in a second; every remote modality probes readiness alike.)"""
    port = free_port()
    registry = f"""include_defaults: false
models:
  - {{id: genserve-gan, modality: image, backend: local, family: gan,
      source: 'package:genserve.models/weights/genserve-gan'}}
  - {{id: self-gan, modality: image, backend: remote, url: 'http://127.0.0.1:{port}/v1', upstream_model: genserve-gan,
      api_key_env: TEST_UPSTREAM_KEY}}
"""
    srv = start_server(tmp_path_factory.mktemp("self"), "self", registry, {"TEST_UPSTREAM_KEY": API_KEY},
                       port=port, timeout=120)
    try:
        before = _model_list_requests(srv)
        r = httpx.get(f"{srv.url}/health/ready", timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["models"] == {"genserve-gan": True, "self-gan": True}
        assert _model_list_requests(srv) - before <= 1
    finally:
        stop_server(srv)


def _model_list_requests(server: Server) -> int:
    return len(re.findall(r'"GET /v1/models HTTP', server.log.read_text()))
