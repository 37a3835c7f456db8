"""C2PA content credentials (app/provenance/credentials.py), read back with c2pa-python's own Reader:
every format genserve signs, a flipped byte, trust given the CA, and the private CA made once."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.server
import io
import json
import threading
from pathlib import Path

import c2pa
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from genserve.app.provenance.credentials import TRAINED, ContentCredentials, UnreadableFile, load_credentials
from genserve.app.provenance.service import sniff
from genserve.app.serving.media import encode


def image(fmt: str) -> bytes:
    out = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def audio(fmt: str) -> bytes:
    t = np.arange(24_000) / 24_000
    return encode((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), fmt, 24_000)


FILES = {"image/png": lambda: image("PNG"), "image/jpeg": lambda: image("JPEG"), "image/webp": lambda: image("WEBP"),
         "image/gif": lambda: image("GIF"), "audio/wav": lambda: audio("wav"), "audio/flac": lambda: audio("flac"),
         "audio/mpeg": lambda: audio("mp3")}


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> ContentCredentials:
    return ContentCredentials(load_credentials(None, None, None, tmp_path_factory.mktemp("state")))


@pytest.mark.parametrize("media_type", list(FILES))
def test_c2pas_reader_finds_the_model_and_trained_algorithmic_media(credentials: ContentCredentials,
                                                                    media_type: str) -> None:
    original = FILES[media_type]()
    signed = credentials.sign(original, media_type, "genserve-gan")
    assert sniff(signed) == media_type
    with c2pa.Reader(media_type, io.BytesIO(signed)) as reader:  # a reader given nothing: valid, untrusted
        store = json.loads(reader.json())
    assert store["validation_state"] == "Valid"
    manifest = store["manifests"][store["active_manifest"]]
    actions = manifest["assertions"][0]["data"]["actions"]
    assert actions[0]["action"] == "c2pa.created" and actions[0]["digitalSourceType"] == TRAINED
    assert actions[0]["parameters"]["model"] == "genserve-gan" and "thumbnail" not in manifest
    assert manifest["claim_generator_info"][0]["name"] == "genserve"
    assert len(signed) - len(original) < 8_000  # the manifest and its two certificates, no thumbnail
    ours = credentials.read(signed, media_type)  # given the CA it made: trusted
    assert ours is not None and ours.validation_state == "Trusted" and ours.model == "genserve-gan"
    assert credentials.read(original, media_type) is None


@pytest.mark.parametrize("media_type", ["image/png", "image/jpeg", "audio/wav"])
def test_one_flipped_byte_of_the_content_makes_the_credentials_invalid(credentials: ContentCredentials,
                                                                       media_type: str) -> None:
    original = FILES[media_type]()
    signed = bytearray(credentials.sign(original, media_type, "m"))
    # a byte of the pixels or samples themselves, never of the manifest (which c2pa puts at the end of a WAV)
    if media_type == "image/png":
        at = bytes(signed).rindex(b"IDAT") + 40
    elif media_type == "audio/wav":
        at = bytes(signed).index(b"data") + 400
    else:  # JPEG: the manifest is in APP11 segments at the start; the end is scan data
        at = len(signed) - 64
    assert signed[at:at + 4] in original
    signed[at] ^= 0x01
    verdict = credentials.read(bytes(signed), media_type)
    assert verdict is not None and verdict.validation_state == "Invalid", verdict
    assert any("mismatch" in p for p in verdict.problems), verdict.problems


def test_servers_starting_together_make_one_ca(tmp_path: Path) -> None:
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        made = list(pool.map(lambda _: load_credentials(None, None, None, tmp_path), range(12)))
    assert len({c.anchors for c in made}) == 1 and len({c.chain for c in made}) == 1
    assert sorted(p.name for p in (tmp_path / "c2pa").iterdir()) == ["ca.key", "ca.pem", "signer.key", "signer.pem"]
    assert [p.name for p in tmp_path.iterdir()] == ["c2pa"]  # no half-made directory left behind


def test_an_operators_certificate_needs_its_key(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("x")
    with pytest.raises(ValueError, match="both"):
        load_credentials(tmp_path / "cert.pem", None, None, tmp_path)


def test_a_certificate_and_key_that_cannot_sign_stop_the_start(tmp_path: Path) -> None:
    a, b = load_credentials(None, None, None, tmp_path / "a"), load_credentials(None, None, None, tmp_path / "b")
    (tmp_path / "cert.pem").write_bytes(a.chain)
    (tmp_path / "key.pem").write_bytes(b.key)  # another certificate's key
    operator = load_credentials(tmp_path / "cert.pem", tmp_path / "key.pem", None, tmp_path)
    with pytest.raises(ValueError, match="cannot sign"):
        ContentCredentials(operator)
    (tmp_path / "key.pem").write_bytes(a.key)
    assert ContentCredentials(load_credentials(tmp_path / "cert.pem", tmp_path / "key.pem", None, tmp_path))


def test_a_file_that_points_at_a_remote_manifest_is_not_fetched(credentials: ContentCredentials) -> None:
    """A file's XMP may name a remote manifest's URL; reading it must not make the server fetch it (SSRF)."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
               '<rdf:Description rdf:about="" xmlns:dcterms="http://purl.org/dc/terms/" dcterms:provenance='
               f'"http://127.0.0.1:{httpd.server_address[1]}/manifest.c2pa"/></rdf:RDF></x:xmpmeta>')
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", xmp)
        out = io.BytesIO()
        Image.new("RGB", (8, 8)).save(out, "PNG", pnginfo=info)
        with contextlib.suppress(UnreadableFile):
            credentials.read(out.getvalue(), "image/png")
        httpd.shutdown()
    assert hits == []


def test_a_broken_file_is_unreadable_not_a_server_error(credentials: ContentCredentials) -> None:
    broken = image("PNG")[:40]  # the signature and half a header
    with pytest.raises(UnreadableFile):
        credentials.read(broken, "image/png")
