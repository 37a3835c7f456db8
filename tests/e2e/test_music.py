"""``POST /v1/audio/music`` on a live server: playable WAV, MIDI that music21 reads back with the
requested tempo and key, and the same bytes for the same seed, alone or batched."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pytest
import soundfile as sf

from tests.conftest import content

SERVER_SET = "audio"

MUSIC = "genserve-music"


def music(server, **body):
    with server.client() as c:
        return c.post("/v1/audio/music", json={"model": MUSIC, **body})


def test_wav_is_playable_and_exactly_as_long_as_asked(server):
    r = music(server, seconds=6, tempo=100, key="D major", seed=3)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    samples, rate = sf.read(io.BytesIO(r.content), dtype="float32")
    assert rate == 22_050 and len(samples) == 6 * rate
    assert 0.3 < abs(samples).max() <= 1.0 and abs(samples[: rate]).max() > 0.01


def test_flac_decodes_to_the_same_audio_as_wav(server):
    wav = music(server, seconds=3, seed=5).content
    flac = music(server, seconds=3, seed=5, response_format="flac")
    assert flac.headers["content-type"] == "audio/flac"
    a, _ = sf.read(io.BytesIO(wav), dtype="int16")
    b, _ = sf.read(io.BytesIO(flac.content), dtype="int16")
    assert (a == b).all()


@pytest.mark.parametrize(("key", "tempo"), [("D major", 90), ("F# minor", 72), ("Bb major", 120)])
def test_midi_parses_back_with_the_requested_tempo_and_key(server, key, tempo):
    from music21 import converter
    from music21 import tempo as m21tempo

    r = music(server, seconds=8, tempo=tempo, key=key, seed=11, response_format="mid")
    assert r.status_code == 200 and r.headers["content-type"] == "audio/midi"
    score = converter.parseData(r.content, format="midi")
    marks = list(score.recurse().getElementsByClass(m21tempo.MetronomeMark))
    assert marks and marks[0].number == pytest.approx(tempo, abs=0.5)
    signature = next(iter(score.recurse().getElementsByClass("KeySignature")))
    wanted_tonic, wanted_mode = key.split()
    found = signature.asKey(wanted_mode)
    assert found.tonic.name.replace("-", "b") == wanted_tonic and found.mode == wanted_mode
    assert len(score.parts) == 4 and len(list(score.recurse().notes)) > 8


def test_same_seed_same_bytes_and_another_seed_other_bytes(server):
    a = content(music(server, seconds=4, seed=21, key="G major").content)
    assert content(music(server, seconds=4, seed=21, key="G major").content) == a
    assert content(music(server, seconds=4, seed=22, key="G major").content) != a
    r = music(server, seconds=2)
    seed = int(r.headers["x-genserve-seed"])
    assert content(music(server, seconds=2, seed=seed).content) == content(r.content)


def test_batched_requests_give_the_same_bytes_as_alone(server):
    body = {"seconds": 5, "tempo": 90, "key": "E minor", "seed": 1234, "temperature": 0.9}
    alone = content(music(server, **body).content)
    before = server.metric("genserve_batch_size_count", model_name=MUSIC)
    others = [{"seconds": 3 + i, "key": "A major", "seed": i} for i in range(4)]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(music, server, **b) for b in [body, *others, body, body, body]]
        results = [f.result() for f in futures]
    batches = server.metric("genserve_batch_size_count", model_name=MUSIC) - before
    assert all(r.status_code == 200 for r in results)
    same = [results[0], *results[5:]]
    assert all(content(r.content) == alone for r in same), "a seeded piece must not depend on its batch"
    assert batches < len(results), f"{len(results)} requests in {batches} batches: they must share batches"


@pytest.mark.parametrize(("body", "param"), [
    ({"key": "H major"}, "key"),
    ({"key": "D dorian"}, "key"),
    ({"seconds": 61}, "seconds"),
    ({"seconds": 0.5}, "seconds"),
    ({"tempo": 300}, "tempo"),
    ({"temperature": 0}, "temperature"),
    ({"response_format": "ogg"}, "response_format"),
])
def test_bad_music_requests_get_400_naming_the_field(server, body, param):
    r = music(server, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_music_model_does_not_speak(server):
    with server.client() as c:
        r = c.post("/v1/audio/speech", json={"model": MUSIC, "voice": "alloy", "input": "hello"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"


def test_music_metrics_count_audio_seconds(server):
    before = server.metric("genserve_audio_seconds_total", model_name=MUSIC)
    music(server, seconds=2.5, seed=1)
    assert server.metric("genserve_audio_seconds_total", model_name=MUSIC) - before == pytest.approx(2.5)


def test_a_client_that_leaves_stops_the_sampling(server):
    """60 s of music at tempo 200 (800 grid steps) for a client that gives up after 0.5 s: the model's
    grid-step counter moves by at most the step running when the server noticed, plus one, after
    that (issue 19: disconnects stop the work within one step; before, the piece ran to its end)."""
    import time

    import httpx

    from tests.conftest import API_KEY

    def steps() -> float:
        return server.metric("genserve_music_steps_total", model_name="genserve-music")

    before = steps()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/audio/music", timeout=0.5, headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": "genserve-music", "seconds": 60, "tempo": 200, "seed": 3, "response_format": "wav"})
    at_leaving = done = steps()
    settled = time.monotonic() + 10
    while time.monotonic() < settled:  # until the counter stops moving
        time.sleep(0.3)
        if (now := steps()) == done:
            break
        done = now
    print(f"grid steps: {done - before:.0f} of 800, {done - at_leaving:.0f} after the client left")
    assert 0 < done - before < 800, "the piece ran to its end after its client left"
    assert done - at_leaving <= 2, "the sampling went on after its client left"
