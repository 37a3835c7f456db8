"""Speech families: espeak-ng as shipped, and transformers' VITS through a tiny randomly initialised
model that the test builds and saves, so the real loading, batching and generation path runs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from genserve.app.backends.local_audio import LocalSpeechBackend, _spawn
from genserve.app.metrics import Metrics
from genserve.app.registry import ModelEntry
from genserve.models.audio import SpeechSpec, split_text
from genserve.models.audio.espeak import read_wav_header
from genserve.models.common.loading import load_family, weights_dir
from genserve.models.params import SpeechParams
from tests.conftest import build_tiny_vits

SPEECH_DIR = weights_dir() / "genserve-speech"


@pytest.fixture(scope="module")
def espeak():
    return load_family("espeak-ng", SPEECH_DIR)


def test_espeak_maps_every_openai_voice_and_accepts_its_own(espeak):
    for name in ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse"):
        assert espeak.resolve_voice(name) == espeak.voices[name]
    assert espeak.resolve_voice("en-gb+f3") == "en-gb+f3"
    for bad in ("robot", "en-us+no-such-variant", "xx-yy", "en-us; rm -rf /"):
        with pytest.raises(ValueError, match="unknown voice"):
            espeak.resolve_voice(bad)


def test_espeak_speed_uses_its_rate_range_then_the_encoder(espeak):
    base = espeak.words_per_minute
    assert espeak.words_per_minute_for(1.0) == round(base) and espeak.residual_tempo(1.0) == 1.0
    assert espeak.words_per_minute_for(0.25) == 80  # espeak-ng's slowest
    assert espeak.residual_tempo(0.25) == pytest.approx(base * 0.25 / 80)
    assert espeak.words_per_minute_for(4.0) == round(4 * base) and espeak.residual_tempo(4.0) == 1.0


def test_espeak_speaks_deterministically_and_faster_means_shorter(espeak):
    text = "Hello world, this is genserve speaking."
    one = espeak.synthesize(SpeechSpec(text, espeak.resolve_voice("alloy")))
    assert np.array_equal(one, espeak.synthesize(SpeechSpec(text, espeak.resolve_voice("alloy"))))
    fast = espeak.synthesize(SpeechSpec(text, espeak.resolve_voice("alloy"), speed=2.0))
    assert 0.4 < len(fast) / len(one) < 0.6
    assert espeak.sample_rate == 22_050 and 0.1 < np.abs(one).max() <= 1.0


def test_wav_header_parser_waits_for_enough_bytes():
    header = (b"RIFF\xff\xff\xff\xffWAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x22\x56\x00\x00"
              b"\x44\xac\x00\x00\x02\x00\x10\x00data\xff\xff\xff\xff")
    assert read_wav_header(header[:20]) is None
    assert read_wav_header(header) == (22_050, 44)
    with pytest.raises(RuntimeError):
        read_wav_header(b"ID3\x04" + header[4:])


def test_split_text_keeps_every_word_in_order_within_the_limit():
    text = "First sentence here. Second one!\nA third, much longer sentence that must be cut somewhere. " * 5
    pieces = split_text(text, 40)
    assert all(0 < len(p) <= 40 for p in pieces)
    assert " ".join(pieces).split() == text.split()


# transformers: a tiny VITS ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_vits(tmp_path_factory) -> Path:
    return build_tiny_vits(tmp_path_factory.mktemp("tiny-vits"))


def test_vits_batch_rows_are_cut_to_their_own_length(tiny_vits):
    model = load_family("transformers-tts", tiny_vits, device="cpu", dtype="float32")
    assert model.sample_rate == 16_000 and model.resolve_voice("ash") == "speaker-1"
    short, long = SpeechSpec("hi", "speaker-0"), SpeechSpec("a much longer sentence than the first", "speaker-0")
    a, b = model.synthesize([short, long])
    assert 0 < len(a) < len(b)
    slow = model.synthesize([SpeechSpec(long.text, "speaker-0", speed=0.5, seed=1)])[0]
    fast = model.synthesize([SpeechSpec(long.text, "speaker-0", speed=2.0, seed=1)])[0]
    assert len(slow) > 2 * len(fast) * 0.8
    with pytest.raises(ValueError, match="speaker-0"):
        model.resolve_voice("speaker-7")


def test_vits_seeded_text_is_the_same_alone_or_batched_through_the_backend(tiny_vits):
    entry = ModelEntry(id="tiny-vits", modality="audio", backend="local", family="transformers-tts",
                       source=str(tiny_vits), device="cpu", max_batch_size=8, max_wait_ms=50)
    metrics = Metrics()
    backend = LocalSpeechBackend(entry, metrics)
    backend.setup()
    text = "Seeded speech is repeatable. Even when it is cut into pieces."

    async def speak(spec: SpeechSpec) -> np.ndarray:
        params = SpeechParams(spec.text, spec.voice, spec.speed, response_format="pcm", seed=spec.seed)
        return np.concatenate([c.samples async for c in backend.speak(params)])

    async def scenario() -> tuple[np.ndarray, list[np.ndarray]]:
        await backend.start()
        alone = await speak(SpeechSpec(text, "speaker-0", seed=42))
        crowd = await asyncio.gather(speak(SpeechSpec(text, "speaker-0", seed=42)),
                                     *(speak(SpeechSpec(f"other text number {i}.", "speaker-0")) for i in range(5)),
                                     speak(SpeechSpec(text, "speaker-0", seed=42)))
        await backend.close()
        return alone, list(crowd)

    alone, crowd = asyncio.run(scenario())
    assert np.array_equal(alone, crowd[0]) and np.array_equal(alone, crowd[-1])
    items = metrics.registry.get_sample_value("genserve_batch_size_sum", {"model_name": "tiny-vits"})
    calls = metrics.registry.get_sample_value("genserve_batch_size_count", {"model_name": "tiny-vits"})
    assert items == 8 and calls <= 3, f"8 pieces in {calls} model calls: concurrent pieces must share calls"


def test_espeak_requests_beyond_the_queue_get_429_and_the_rest_all_speak() -> None:
    """espeak-ng runs one process per request, at most ``max_batch_size`` at once; the requests waiting
    for one were unbounded (100 taken with max_waiting 64). Now the one past ``max_waiting`` is a 429."""
    from genserve.app.errors import RateLimitError

    entry = ModelEntry(id="genserve-speech", modality="audio", backend="local", family="espeak-ng",
                       source=str(SPEECH_DIR), max_batch_size=1, max_waiting=2)
    backend = LocalSpeechBackend(entry, Metrics())
    backend.setup()

    async def speak(text: str) -> int:
        params = SpeechParams(text, "alloy", 1.0, response_format="pcm")
        return sum([len(c.samples) async for c in backend.speak(params)])

    async def scenario() -> list[int | BaseException]:
        await backend.start()
        try:
            return await asyncio.gather(*(speak(f"Request number {i} is spoken.") for i in range(4)),
                                        return_exceptions=True)
        finally:
            await backend.close()

    results = asyncio.run(scenario())
    assert isinstance(results[3], RateLimitError) and results[3].headers["Retry-After"] == "1"
    assert all(isinstance(n, int) and n > 0 for n in results[:3]), results  # one running, two queued


def _espeak_children() -> list[int]:
    """espeak-ng processes whose parent is this process."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if "espeak" in name and int(rest[1]) == os.getpid():
            found.append(int(stat.parent.name))
    return found


def test_espeak_speaks_a_text_longer_than_its_pipe_and_callers_that_leave_leave_no_process() -> None:
    """On uvloop, as the server runs: the process starts from a thread (``_spawn``; uvloop's own spawn
    forks the whole server) and its text is written from one, so 84 KB, more than a pipe holds, is spoken
    whole. A caller that leaves after one chunk, or while the process is starting, leaves no espeak-ng
    behind, not even a zombie, before anything else starts a process (which would reap one)."""
    import uvloop

    entry = ModelEntry(id="genserve-speech", modality="audio", backend="local", family="espeak-ng",
                       source=str(SPEECH_DIR), max_batch_size=4, max_waiting=4)
    backend = LocalSpeechBackend(entry, Metrics())
    backend.setup()
    sentence = "A sentence to speak. "

    async def none_left(after: str) -> None:
        deadline = time.monotonic() + 10
        while found := _espeak_children():
            assert time.monotonic() < deadline, f"espeak-ng left after {after}: {found}"
            await asyncio.sleep(0.02)

    async def scenario() -> tuple[float, float]:
        await backend.start()
        try:
            short = sum([len(c.samples) async for c in backend.speak(SpeechParams(sentence, "alloy", 1.0, "pcm"))])
            # Only the first chunk of about an hour of speech is read, then the caller leaves.
            async with contextlib.aclosing(backend.speak(SpeechParams(sentence * 9000, "alloy", 1.0, "pcm"))) as it:
                await anext(it)
            await none_left("a caller that read one chunk")
            starting = asyncio.ensure_future(_spawn(backend.model.argv(SpeechSpec(sentence, "en-us"))))
            await asyncio.sleep(0)  # the process is starting in its thread now
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            await asyncio.sleep(0.5)  # the thread has started it by now, and _spawn stopped it
            await none_left("a caller that left while it started")
            whole = sum([len(c.samples) async for c in backend.speak(
                SpeechParams(sentence * 4000, "alloy", 1.0, response_format="pcm"))])  # 84 KB: a pipe holds 64
            await none_left("a whole utterance")
            return short, whole
        finally:
            await backend.close()

    short, whole = uvloop.run(scenario())
    assert whole > 3900 * short  # every sentence spoken (the first and last carry a little more silence)


def test_a_process_still_starting_when_the_loop_ends_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's loop ends (shutdown) while ``_spawn``'s thread is still starting espeak-ng: every task
    is cancelled, the loop closes, and the process the thread then starts is stopped and reaped all the
    same (the stop hangs on the thread's future, not on a task of the closed loop)."""
    import uvloop

    from genserve.app.backends import local_audio

    real = subprocess.Popen

    def slow(*args: object, **kwargs: object) -> subprocess.Popen:
        time.sleep(0.3)  # the loop is gone by the time the process exists
        return real(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(local_audio.subprocess, "Popen", slow)
    argv = load_family("espeak-ng", SPEECH_DIR).argv(SpeechSpec("A sentence to speak.", "en-us"))

    async def leave_it_starting() -> asyncio.Future:
        task = asyncio.ensure_future(_spawn(argv))
        await asyncio.sleep(0.05)  # the thread is in Popen; returning ends the loop and cancels the task
        return task

    uvloop.run(leave_it_starting())
    time.sleep(0.6)  # the thread has started the process by now
    deadline = time.monotonic() + 10
    while found := _espeak_children():
        assert time.monotonic() < deadline, f"espeak-ng left after the loop ended: {found}"
        time.sleep(0.02)


def test_speakable_skips_pictographs_and_keeps_words_and_symbols_that_are_words():
    from genserve.models.audio import speakable

    assert speakable("👋🏽 Hello there. 🎉🎉\u200d🔥 Bye ❤️") == "Hello there. Bye"
    assert speakable("🎉👍🏽❤️🇫🇷⭐1️⃣" * 50) == "1" * 50  # a keycap's digit is a digit
    assert speakable("Café №5 — 3°C, 50% © x² ™ → ok") == "Café №5 — 3°C, 50% © x² ™ → ok"
