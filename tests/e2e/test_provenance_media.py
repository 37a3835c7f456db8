"""C2PA content credentials on served images and audio, read with c2pa-python's own Reader, the
image watermark on served images, and ``/v1/provenance/verify`` on files: trusted as served, invalid
when altered, no credentials once re-encoded but the watermark still found, nothing found in images
genserve did not make."""

from __future__ import annotations

import base64
import io
import json

import c2pa
import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import Server, ServerSets
from tests.e2e.test_errors import assert_openai_error

SERVER_SET = "image"
UPSTREAM_SETS = ("audio",)
TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def manifest(data: bytes, media_type: str) -> tuple[str, dict]:
    """The validation state and the c2pa.created action, as a reader given no trust anchor sees them."""
    with c2pa.Reader(media_type, io.BytesIO(data)) as reader:
        store = json.loads(reader.json())
    active = store["manifests"][store["active_manifest"]]
    return store["validation_state"], active["assertions"][0]["data"]["actions"][0]


def verify_file(server: Server, data: bytes, name: str = "f") -> httpx.Response:
    with server.client() as c:
        return c.post("/v1/provenance/verify", files={"file": (name, data)})


@pytest.fixture(scope="module")
def gan_png(server: Server) -> tuple[bytes, dict]:
    with server.client() as c:
        r = c.post("/v1/images/generations", json={"model": "genserve-gan", "prompt": "7", "seed": 3, "size": "32x32"})
    assert r.status_code == 200, r.text
    return base64.b64decode(r.json()["data"][0]["b64_json"]), r.json()["provenance"]


def test_a_served_png_carries_credentials_naming_its_model(gan_png: tuple[bytes, dict]) -> None:
    png, provenance = gan_png
    state, action = manifest(png, "image/png")
    assert state == "Valid"  # intact; this reader was not given the server's CA
    assert action["action"] == "c2pa.created" and action["digitalSourceType"] == TRAINED
    assert action["parameters"]["model"] == "genserve-gan" and action["softwareAgent"]["name"] == "genserve"
    assert provenance["c2pa"] is True and provenance["watermarked"] is False and provenance["model"] == "genserve-gan"
    assert "images under 256x256 pixels (or with a side under 64) carry no watermark" in provenance["reason"]


def test_verify_trusts_what_it_served_and_finds_alteration_and_stripping(server: Server, gan_png) -> None:
    png, _ = gan_png
    v = verify_file(server, png).json()
    assert v["media_type"] == "image/png" and v["watermark"] is None
    assert v["c2pa"]["validation_state"] == "Trusted" and v["c2pa"]["model"] == "genserve-gan"
    assert v["c2pa"]["digital_source_type"] == TRAINED and v["c2pa"]["issuer"] == "genserve operator"
    altered = bytearray(png)
    altered[png.rindex(b"IDAT") + 20] ^= 1
    bad = verify_file(server, bytes(altered)).json()["c2pa"]
    assert bad["validation_state"] == "Invalid" and any("mismatch" in p for p in bad["problems"]), bad
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(jpeg, "JPEG", quality=90)
    stripped = verify_file(server, jpeg.getvalue(), "re-encoded.jpg").json()
    assert stripped["media_type"] == "image/jpeg" and stripped["c2pa"] is None


@pytest.fixture(scope="module")
def diffusion_256(server: Server) -> list[tuple[bytes, dict]]:
    with server.client() as c:
        r = c.post("/v1/images/generations", json={"model": "genserve-diffusion", "prompt": "red apple", "n": 2,
                                                   "seed": 5, "size": "256x256", "num_inference_steps": 6})
    assert r.status_code == 200, r.text
    return [(base64.b64decode(d["b64_json"]), r.json()["provenance"]) for d in r.json()["data"]]


def test_images_of_256x256_carry_the_watermark_and_verify_names_the_model(server: Server, diffusion_256) -> None:
    for png, provenance in diffusion_256:
        assert provenance["watermarked"] is True and provenance["c2pa"] is True and "reason" not in provenance
        assert provenance["scheme"] == "genserve-dwt-dct-svd-v1"
        mark = verify_file(server, png).json()["watermark"]
        assert mark["detected"] is True and mark["model"] == "genserve-diffusion" and mark["bits_agreeing"] == 64
        # only models that make images big enough to carry a payload are checked (not the 64x64 GAN)
        assert mark["p_value"] < 1e-15 and mark["models_checked"] == ["genserve-diffusion"]


def recoded(png: bytes, fmt: str, **kw: object) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(out, fmt, **kw)
    return out.getvalue()


@pytest.mark.parametrize("attack", ["jpeg90", "jpeg75", "crop10"])
def test_the_watermark_identifies_an_image_whose_credentials_were_stripped(server: Server, diffusion_256,
                                                                          attack: str) -> None:
    """The main rows of docs/provenance.md's robustness table, on served images."""
    alter = {"jpeg90": lambda png: recoded(png, "JPEG", quality=90),
             "jpeg75": lambda png: recoded(png, "JPEG", quality=75), "crop10": lambda png: _crop(png)}[attack]
    for png, _ in diffusion_256:
        v = verify_file(server, alter(png)).json()
        assert v["c2pa"] is None and v["watermark"]["detected"] is True, v["watermark"]
        assert v["watermark"]["model"] == "genserve-diffusion"


def _crop(png: bytes) -> bytes:
    """10% of each side cut off, 5% at each edge (the grid moves: found by verify's search)."""
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).crop((13, 13, 243, 243)).save(out, "PNG")
    return out.getvalue()


def test_images_genserve_did_not_make_are_not_flagged(server: Server) -> None:
    from sklearn.datasets import load_sample_images  # two photographs that ship with scikit-learn

    for photo in load_sample_images().images:
        for top, left in [(0, 0), (100, 300)]:
            out = io.BytesIO()
            Image.fromarray(photo[top:top + 256, left:left + 256]).save(out, "PNG")
            mark = verify_file(server, out.getvalue()).json()["watermark"]
            assert mark["detected"] is False and mark["model"] is None and mark["p_value"] > 1e-3, mark


def test_an_inpainting_keeps_its_pixels_and_says_it_carries_no_watermark(server: Server, diffusion_256) -> None:
    png, _ = diffusion_256[0]
    rgba = Image.open(io.BytesIO(png)).convert("RGBA")
    rgba.paste((0, 0, 0, 0), (96, 96, 160, 160))
    upload = io.BytesIO()
    rgba.save(upload, "PNG")
    with server.client() as c:
        r = c.post("/v1/images/edits", data={"model": "genserve-diffusion", "prompt": "red apple", "size": "256x256",
                                             "num_inference_steps": 4},
                   files={"image": ("in.png", upload.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    provenance = r.json()["provenance"]
    assert provenance["watermarked"] is False and "inpainting keeps the pixels" in provenance["reason"]
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB"))
    kept = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert np.array_equal(out[:96], kept[:96])  # the caller's (watermarked) pixels, exactly


@pytest.mark.parametrize(("output_format", "media_type"), [("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_served_jpeg_and_webp_carry_credentials_too(server: Server, output_format: str, media_type: str) -> None:
    with server.client() as c:
        r = c.post("/v1/images/generations", json={"model": "genserve-gan", "prompt": "7", "seed": 3, "size": "32x32",
                                                   "output_format": output_format, "output_compression": 80})
    assert r.status_code == 200, r.text
    data = base64.b64decode(r.json()["data"][0]["b64_json"])
    assert Image.open(io.BytesIO(data)).format == output_format.upper() and r.json()["provenance"]["c2pa"]
    state, action = manifest(data, media_type)
    assert state == "Valid" and action["parameters"]["model"] == "genserve-gan"
    assert verify_file(server, data).json()["c2pa"]["validation_state"] == "Trusted"
    with server.client() as c:
        bad = c.post("/v1/images/generations", json={"model": "genserve-gan", "prompt": "7", "output_compression": 80})
    assert_openai_error(bad, 400, "output_compression")  # PNG has no quality


def test_url_images_and_interpolation_gifs_are_signed_too(server: Server) -> None:
    with server.client() as c:
        url = c.post("/v1/images/generations", json={"model": "genserve-vae", "prompt": "3", "seed": 1,
                                                     "response_format": "url"}).json()["data"][0]["url"]
        stored = httpx.get(url, timeout=30).content
        gif = c.post("/v1/images/interpolations", json={"model": "genserve-gan", "seed_start": 1, "seed_end": 2,
                                                        "frames": 3, "format": "gif"}).json()["data"][0]["b64_json"]
    assert manifest(stored, "image/png")[1]["parameters"]["model"] == "genserve-vae"
    assert manifest(base64.b64decode(gif), "image/gif")[1]["parameters"]["model"] == "genserve-gan"


@pytest.mark.parametrize(("path", "body", "media_type", "signed"), [
    ("/v1/audio/music", {"model": "genserve-music", "seconds": 2, "seed": 1, "response_format": "wav"}, "audio/wav",
     True),
    ("/v1/audio/music", {"model": "genserve-music", "seconds": 2, "seed": 1, "response_format": "flac"}, "audio/flac",
     True),
    ("/v1/audio/music", {"model": "genserve-music", "seconds": 2, "seed": 1, "response_format": "mp3"}, "audio/mpeg",
     True),
    ("/v1/audio/speech", {"model": "genserve-speech", "input": "Made by a model.", "voice": "alloy",
                          "response_format": "flac"}, "audio/flac", True),  # FLAC comes whole: signed
    ("/v1/audio/speech", {"model": "genserve-speech", "input": "Made by a model.", "voice": "alloy",
                          "response_format": "mp3"}, "audio/mpeg", False),  # streamed as spoken: not
], ids=["music-wav", "music-flac", "music-mp3", "speech-flac", "speech-mp3"])
def test_audio_made_whole_is_signed_and_its_headers_say_so(sets: ServerSets, path: str, body: dict, media_type: str,
                                                           signed: bool) -> None:
    audio = sets.get("audio")
    with audio.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-genserve-c2pa"] == str(signed).lower() and r.headers["x-genserve-model"] == body["model"]
    assert r.headers["x-genserve-ai-generated"] == "true" and r.headers["x-genserve-watermarked"] == "false"
    v = verify_file(audio, r.content).json()
    assert v["media_type"] == media_type
    if signed:
        assert manifest(r.content, media_type)[1]["parameters"]["model"] == body["model"]
        assert v["c2pa"]["validation_state"] == "Trusted"
    else:
        assert v["c2pa"] is None


@pytest.fixture(scope="module")
def sets(server_sets: ServerSets) -> ServerSets:
    return server_sets


@pytest.mark.parametrize(("files", "param"), [
    ({"file": ("notes.txt", b"just some text, not media")}, "file"),
    ({"other": ("x.png", b"\x89PNG\r\n\x1a\n")}, "file"),
    ({"file": ("broken.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00")}, "file"),  # a PNG's start, then nothing
])
def test_files_it_cannot_check_are_400s(server: Server, files: dict, param: str) -> None:
    with server.client() as c:
        assert_openai_error(c.post("/v1/provenance/verify", files=files), 400, param)
