"""``POST /v1/audio/speech`` on a live server: the OpenAI SDK in every format, streaming, errors, and
what pocketsphinx hears.

The word error rate bound: pocketsphinx's acoustic model was trained on recorded human speech, and
espeak-ng is a formant synthesiser, so even perfect espeak-ng speech is misheard often. Measured
on these ten sentences (84 words) through this server (wav → 16 kHz), voice ``alloy`` (espeak-ng
``en-us+f5``, the variant pocketsphinx understands best of the 30 tried) scores a WER of 0.274;
the thirteen OpenAI voices score 0.27–0.95, and the same transcripts scored against the wrong
sentences (a control for "audio that is not these words") 0.96–1.07. The bound of 0.45 sits
between with room for decoder drift across versions (about 15 more misheard words), and fails for
silence, noise, wrong text, the wrong sample rate or a mangled encoding.
"""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor

import av
import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.conftest import API_KEY

SERVER_SET = "audio"

SPEECH = "genserve-speech"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back when you get home tonight.",
    "The weather today is sunny with a light breeze.",
    "She bought three red apples at the market.",
    "We will meet at the station at seven o'clock.",
    "Open the door and turn on the light.",
    "My brother plays the piano every evening.",
    "The train to the city leaves in ten minutes.",
    "I would like a cup of coffee with milk.",
    "They walked along the river after dinner.",
]
WER_BOUND = 0.45


def speech(server, **body) -> httpx.Response:
    with server.client() as c:
        return c.post("/v1/audio/speech", json={"model": SPEECH, "voice": "alloy", **body})


def decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768, 24_000
    if fmt == "aac":
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            return np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)]), stream.rate
    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    return samples, rate


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_openai_sdk_gets_each_format_at_24_khz(openai_client, fmt):
    response = openai_client.audio.speech.create(model=SPEECH, voice="alloy", response_format=fmt,
                                                 input="Hello from genserve. Every format decodes.")
    samples, rate = decode(response.content, fmt)
    assert rate == 24_000
    assert 1.5 < len(samples) / rate < 5.0  # about 2.6 s of speech at 160 words per minute
    assert np.abs(samples).max() > 0.1


def test_speed_changes_duration(openai_client):
    durations = {}
    for speed in (0.25, 1.0, 4.0):
        data = openai_client.audio.speech.create(model=SPEECH, voice="alloy", input="Time flies like an arrow.",
                                                 response_format="pcm", speed=speed).content
        durations[speed] = len(data) / 2 / 24_000
    assert durations[0.25] / durations[1.0] == pytest.approx(4.0, rel=0.25)
    assert durations[1.0] / durations[4.0] == pytest.approx(4.0, rel=0.25)


def test_long_input_streams_in_chunks_before_it_ends(server):
    text = " ".join(f"This is sentence {i} of a long text." for i in range(80))
    with server.client() as c, c.stream("POST", "/v1/audio/speech",
                                        json={"model": SPEECH, "voice": "alloy", "input": text,
                                              "response_format": "pcm"}) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "audio/pcm"
        sizes = [len(chunk) for chunk in r.iter_raw()]
    assert len(sizes) > 10 and sum(sizes) / 2 / 24_000 > 120


def test_emoji_are_skipped_not_read_out(server):
    """espeak-ng read each emoji's name: 4,096 emoji made a 32 MB WAV. They are skipped, as a reader would."""
    plain = speech(server, input="Hello there.", response_format="wav")
    decorated = speech(server, input="👋🏽 Hello there. 🎉🎉‍🔥", response_format="wav")
    assert plain.status_code == decorated.status_code == 200 and decorated.content == plain.content
    r = speech(server, input="🎉👍🏽❤️" * 800, response_format="wav")  # 4,000 characters
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    assert r.json()["error"]["message"] == "input has nothing to speak: emoji and other pictographs are not read out."


def test_same_request_same_bytes(server):
    a = speech(server, input="Determinism matters.", response_format="mp3")
    b = speech(server, input="Determinism matters.", response_format="mp3")
    assert a.status_code == 200 and a.content == b.content


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[-1]


def transcribe(wav: bytes) -> str:
    from pocketsphinx import Decoder
    from scipy.signal import resample_poly

    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    assert rate == 24_000
    pcm = (np.clip(resample_poly(samples, 2, 3), -1, 1) * 32767).astype(np.int16).tobytes()  # 16 kHz
    decoder = Decoder(samprate=16_000)
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)
    decoder.end_utt()
    return decoder.hyp().hypstr if decoder.hyp() else ""


def test_pocketsphinx_hears_the_words(server):
    hyps = [transcribe(speech(server, voice="alloy", input=s, response_format="wav").content) for s in SENTENCES]
    total = sum(len(words(s)) for s in SENTENCES)
    wer = sum(edit_distance(words(s), words(h)) for s, h in zip(SENTENCES, hyps, strict=True)) / total
    control = sum(edit_distance(words(s), words(h)) for s, h in zip(SENTENCES, hyps[1:] + hyps[:1],
                                                                     strict=True)) / total
    assert control > 0.9, "scored against the wrong sentences, the transcripts must look wrong"
    assert wer < WER_BOUND, f"WER {wer:.3f}: {hyps}"


@pytest.mark.parametrize(("body", "param", "text"), [
    ({"voice": "robot"}, "voice", "alloy"),
    ({"response_format": "ogg"}, "response_format", "mp3, opus, aac, flac, wav, pcm"),
    ({"speed": 5.0}, "speed", "4"),
    ({"input": "x" * 4097}, "input", "4096"),
    ({"input": ""}, "input", ""),
    ({"instructions": "whisper"}, "instructions", "instructions"),
    ({"stream_format": "sse"}, "stream_format", "audio"),
])
def test_bad_speech_requests_get_400_naming_the_field(server, body, param, text):
    r = speech(server, **{"input": "hello", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and text in error["message"]


def test_speech_model_is_not_a_music_model(server):
    with server.client() as c:
        r = c.post("/v1/audio/music", json={"model": SPEECH, "seconds": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"


def test_speech_metrics_count_audio_seconds(server):
    before = server.metric("genserve_audio_seconds_total", model_name=SPEECH)
    data = speech(server, input="Counting seconds.", response_format="pcm").content
    after = server.metric("genserve_audio_seconds_total", model_name=SPEECH)
    assert after - before == pytest.approx(len(data) / 2 / 24_000, abs=1e-3)
    assert server.metric("genserve_audio_real_time_factor_count", model_name=SPEECH) >= 1


def test_speech_needs_an_api_key(server):
    r = httpx.post(f"{server.url}/v1/audio/speech", json={"model": SPEECH, "voice": "alloy", "input": "hi"})
    assert r.status_code == 401
    assert API_KEY not in r.text


def test_transformers_tts_model_serves_through_the_same_endpoint(openai_client, server):
    """``tiny-vits``: a random VITS the fixture saved with transformers, loaded by the
    ``transformers-tts`` family; a seed gives the same audio alone or among concurrent requests."""
    def say(text: str, seed: int | None = None) -> bytes:
        extra = {"seed": seed} if seed is not None else {}
        return openai_client.audio.speech.create(model="tiny-vits", voice="ash", input=text, response_format="wav",
                                                 extra_body=extra).content

    samples, rate = decode(say("a seeded sentence.", seed=9), "wav")
    assert rate == 24_000 and len(samples) > 0  # the model's 16 kHz, resampled
    alone = say("a seeded sentence. and a second one!", seed=9)
    with ThreadPoolExecutor(6) as pool:
        crowd = list(pool.map(lambda i: say("a seeded sentence. and a second one!", seed=9) if i % 2 else
                              say(f"unseeded text {i}."), range(6)))
    assert all(crowd[i] == alone for i in (1, 3, 5))


def test_speech_input_is_moderated(server):
    r = speech(server, input="I am going to kill you and your whole family tonight.")
    assert r.status_code == 400
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("content_policy_violation", "input")
    assert speech(server, input="How do I kill a Python process?", response_format="wav").status_code == 200


def espeak_children(pid: int) -> list[int]:
    """The espeak-ng processes ``pid`` runs (from /proc: the kernel's own count, not a timing)."""
    found = []
    for entry in __import__("pathlib").Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            if entry.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid and "espeak" in stat:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_a_client_that_leaves_stops_espeak(server):
    """About 4 minutes of speech streamed to a client that reads one chunk and leaves: the espeak-ng
    process speaking it is killed (it would otherwise sit blocked on its full pipe, or speak on), so
    the synthesis stops at the chunk being read (issue 19: disconnects stop the work)."""
    import time

    text = " ".join(f"Sentence number {i} of a long reading that nobody will hear to its end." for i in range(50))
    body = {"model": "genserve-speech", "input": text, "voice": "alloy", "response_format": "pcm"}
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", timeout=30, json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200
        chunks = r.iter_bytes()
        next(chunks)
        assert espeak_children(server.proc.pid), "espeak-ng is not speaking while the stream is read"
    deadline = time.monotonic() + 10
    while espeak_children(server.proc.pid):
        assert time.monotonic() < deadline, "espeak-ng went on after its client left"
        time.sleep(0.1)
