"""Every response format decodes back to the audio that went in: length, rate, and content."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import soundfile as sf

from genserve.app.serving.media import FORMATS, OUTPUT_RATE, AudioEncoder, atempo_chain, encode

RATE = 22_050
TONE = (0.5 * np.sin(2 * np.pi * 440 * np.arange(2 * RATE) / RATE)).astype(np.float32)  # 2 s of A4


def decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768, OUTPUT_RATE
    if fmt in ("wav", "flac", "mp3", "opus"):
        samples, rate = sf.read(io.BytesIO(data), dtype="float32")
        return samples, rate
    with av.open(io.BytesIO(data)) as container:  # aac: libsndfile has no AAC decoder
        stream = container.streams.audio[0]
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(stream)]
        return np.concatenate(frames), stream.rate


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_streamed_chunks_decode_to_the_input_at_24_khz(fmt):
    encoder = AudioEncoder(fmt, RATE, OUTPUT_RATE)
    chunks = [encoder.feed(TONE[i:i + 2205]) for i in range(0, len(TONE), 2205)]
    data = b"".join(chunks) + encoder.finish()
    if FORMATS[fmt].streams:
        assert sum(map(len, chunks)) > len(data) // 2, "bytes must leave as audio arrives, not at the end"
    samples, rate = decode(data, fmt)
    assert rate == OUTPUT_RATE
    # Lossy codecs add encoder delay and padding (mp3, aac: up to ~2 frames); lossless ones are exact.
    slack = 0 if fmt in ("wav", "pcm", "flac", "opus") else 4096
    assert 2 * OUTPUT_RATE <= len(samples) <= 2 * OUTPUT_RATE + slack
    assert abs(dominant_hz(samples, rate) - 440) < 2
    assert 0.4 < np.abs(samples).max() < 0.6


def test_flac_comes_whole_with_its_length_in_the_header():
    encoder = AudioEncoder("flac", RATE, OUTPUT_RATE)
    assert encoder.feed(TONE) == b""
    info = sf.info(io.BytesIO(encoder.finish()))
    assert info.frames == 2 * OUTPUT_RATE and info.samplerate == OUTPUT_RATE


@pytest.mark.parametrize("tempo", [0.25, 0.5, 2.0, 4.0])
def test_tempo_changes_length_but_not_pitch(tempo):
    samples, rate = decode(encode(TONE, "wav", RATE, OUTPUT_RATE, tempo=tempo), "wav")
    assert len(samples) == pytest.approx(2 * OUTPUT_RATE / tempo, rel=0.02)
    assert abs(dominant_hz(samples, rate) - 440) < 2


def test_atempo_chain_stays_in_range_and_multiplies_out():
    for tempo in (0.1, 0.25, 0.5, 0.7, 1.0, 3.0, 4.0):
        chain = atempo_chain(tempo)
        assert all(0.5 <= f <= 2.0 for f in chain)
        assert np.prod(chain) == pytest.approx(tempo)
    assert atempo_chain(1.0) == []


def test_unknown_format_is_refused_by_name():
    with pytest.raises(ValueError, match="supported: mp3, opus, aac, flac, wav, pcm"):
        AudioEncoder("ogg", RATE)


def test_encoding_is_deterministic():
    assert encode(TONE, "mp3", RATE, OUTPUT_RATE) == encode(TONE, "mp3", RATE, OUTPUT_RATE)
