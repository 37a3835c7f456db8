"""Media out: every byte encoding of the API in one place. Images become PNG (a frame) or GIF (an
animation); audio becomes the speech and music formats. An ``ImageArtifact`` or ``AudioChunk`` that
already carries ``encoded`` bytes (an upstream's) passes through unchanged; pixels and samples are
encoded here.

``AudioEncoder`` pushes mono float32 chunks through one FFmpeg filter graph (tempo change without
pitch change, resampling to the output rate, 16-bit samples) and then an encoder and container,
both from FFmpeg through PyAV, returning whatever bytes each chunk completes. Every format streams
except FLAC, whose header (STREAMINFO: the total length) is only right once the audio has ended, so
FLAC comes out whole when ``finish`` is called (decoders such as libsndfile refuse a FLAC stream
without its length).
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass
from fractions import Fraction
from typing import cast

import av
import numpy as np
from av.audio.frame import AudioFrame
from av.audio.stream import AudioStream
from av.container import OutputContainer
from PIL import Image

from genserve.app.backends.base import AudioChunk, ImageArtifact

OUTPUT_RATE = 24_000  # OpenAI's speech API: pcm is 24 kHz signed 16-bit little-endian mono


@dataclass(frozen=True)
class AudioFormat:
    container: str | None  # FFmpeg muxer; None: raw samples
    codec: str | None
    media_type: str
    streams: bool = True


FORMATS: dict[str, AudioFormat] = {
    "mp3": AudioFormat("mp3", "libmp3lame", "audio/mpeg"),
    "opus": AudioFormat("ogg", "libopus", "audio/ogg"),
    "aac": AudioFormat("adts", "aac", "audio/aac"),
    "flac": AudioFormat("flac", "flac", "audio/flac", streams=False),
    "wav": AudioFormat("wav", "pcm_s16le", "audio/wav"),
    "pcm": AudioFormat(None, None, "audio/pcm"),
}
ATEMPO_RANGE = (0.5, 2.0)  # one atempo filter's range; larger changes chain several


def atempo_chain(tempo: float) -> list[float]:
    """Factors within ``ATEMPO_RANGE`` whose product is ``tempo``."""
    lo, hi = ATEMPO_RANGE
    factors = []
    while tempo < lo or tempo > hi:
        step = lo if tempo < lo else hi
        factors.append(step)
        tempo /= step
    return [*factors, tempo] if abs(tempo - 1.0) > 1e-6 else factors


class _Sink(io.RawIOBase):
    """A write-only, non-seekable file that hands over what was written since the last ``take``."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.buf += data
        return len(data)

    def take(self) -> bytes:
        out, self.buf = bytes(self.buf), bytearray()
        return out


class AudioEncoder:
    """``feed(samples)`` → bytes ready now; ``finish()`` → the rest. ``samples`` are mono float32 at
    ``in_rate``; output is at ``out_rate`` (default: unchanged), played ``tempo`` times faster."""

    def __init__(self, fmt: str, in_rate: int, out_rate: int | None = None, tempo: float = 1.0) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown audio format {fmt!r}; supported: {', '.join(FORMATS)}")
        self.format, self.in_rate, self.out_rate = FORMATS[fmt], in_rate, out_rate or in_rate
        self.samples_in = 0
        self.samples_out = 0
        self._graph = self._build_graph(tempo)
        self._sink: _Sink | io.BytesIO | None = None
        self._container: OutputContainer | None = None
        self._stream: AudioStream | None = None
        if self.format.container is not None and self.format.codec is not None:
            self._sink = _Sink() if self.format.streams else io.BytesIO()
            options = {"page_duration": "100000"} if self.format.container == "ogg" else {}
            self._container = av.open(self._sink, "w", format=self.format.container, options=options)
            self._stream = cast(AudioStream, self._container.add_stream(self.format.codec, rate=self.out_rate))
            self._stream.layout = "mono"

    def _build_graph(self, tempo: float) -> av.filter.Graph:
        graph = av.filter.Graph()
        chain = [graph.add_abuffer(format="flt", sample_rate=self.in_rate, layout="mono",
                                   time_base=Fraction(1, self.in_rate))]
        chain += [graph.add("atempo", f"{f:.6f}") for f in atempo_chain(tempo)]
        chain += [graph.add("aresample", str(self.out_rate)),
                  graph.add("aformat", f"sample_fmts=s16:channel_layouts=mono:sample_rates={self.out_rate}"),
                  graph.add("abuffersink")]
        for a, b in itertools.pairwise(chain):
            a.link_to(b)
        graph.configure()
        return graph

    def feed(self, samples: np.ndarray) -> bytes:
        samples = np.clip(np.asarray(samples, dtype=np.float32).reshape(1, -1), -1.0, 1.0)
        if samples.size == 0:
            return b""
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = self.in_rate, self.samples_in, Fraction(1, self.in_rate)
        self.samples_in += samples.shape[1]
        self._graph.push(frame)
        return self._drain()

    def finish(self) -> bytes:
        self._graph.push(None)
        out = self._drain()
        if self._container is None or self._stream is None:
            return out
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        if isinstance(self._sink, _Sink):
            return out + self._sink.take()
        assert self._sink is not None
        return self._sink.getvalue()

    def _drain(self) -> bytes:
        raw = bytearray()
        while True:
            try:
                frame = cast(AudioFrame, self._graph.pull())
            except (BlockingIOError, EOFError):
                break
            self.samples_out += frame.samples
            if self._container is None or self._stream is None:
                raw += frame.to_ndarray().astype("<i2").tobytes()
                continue
            frame.pts = None  # the encoder numbers its own frames
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        if isinstance(self._sink, _Sink):
            return bytes(raw) + self._sink.take()
        return bytes(raw)


def encode(samples: np.ndarray, fmt: str, in_rate: int, out_rate: int | None = None, tempo: float = 1.0) -> bytes:
    """The whole of ``samples`` in ``fmt`` in one go."""
    encoder = AudioEncoder(fmt, in_rate, out_rate, tempo)
    data = encoder.feed(samples) + encoder.finish()
    return sized_wav(data) if fmt == "wav" else data


def sized_wav(data: bytes) -> bytes:
    """A WAV written as a stream says "length unknown" in its RIFF and data chunk sizes; a whole one gets
    its true sizes (which strict readers, C2PA's among them, require)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return data
    out, pos = bytearray(data), 12
    out[4:8] = (len(out) - 8).to_bytes(4, "little")
    while pos + 8 <= len(out):
        size = int.from_bytes(out[pos + 4:pos + 8], "little")
        if out[pos:pos + 4] == b"data":
            out[pos + 4:pos + 8] = (len(out) - pos - 8).to_bytes(4, "little")
            break
        pos += 8 + size + (size & 1)
    return bytes(out)


# images -----------------------------------------------------------------------------------------
def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def gif(frames: np.ndarray, frame_ms: int = 120) -> bytes:
    out = io.BytesIO()
    images = [Image.fromarray(f) for f in frames]
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return out.getvalue()


def image_bytes(artifact: ImageArtifact, quality: int | None = None) -> bytes:
    """The artifact as the bytes of its ``media_type``: upstream bytes as they came, else a GIF of its
    frames, or its pixels as PNG, JPEG or WebP (``quality`` 0-100 for the last two, default 100)."""
    if artifact.encoded is not None:
        return artifact.encoded
    if artifact.frames is not None:
        return gif(artifact.frames)
    if artifact.pixels is None:
        raise ValueError("an image artifact without pixels, frames or encoded bytes")
    if artifact.media_type == "image/png":
        return png(artifact.pixels)
    out = io.BytesIO()
    fmt = {"image/jpeg": "JPEG", "image/webp": "WEBP"}[artifact.media_type]
    Image.fromarray(artifact.pixels).save(out, format=fmt, quality=100 if quality is None else quality)
    return out.getvalue()


def artifact_pixels(artifact: ImageArtifact) -> list[np.ndarray]:
    """What an artifact shows, as (H, W, 3) uint8 images: its pixels, its frames, or its bytes decoded (an
    upstream's PNG or GIF, every frame)."""
    if artifact.pixels is not None:
        return [artifact.pixels]
    if artifact.frames is not None:
        return list(artifact.frames)
    if artifact.encoded is None:
        raise ValueError("an image artifact without pixels, frames or encoded bytes")
    out = []
    with Image.open(io.BytesIO(artifact.encoded)) as im:
        for k in range(getattr(im, "n_frames", 1)):
            im.seek(k)
            out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return out


# audio ------------------------------------------------------------------------------------------
class ChunkEncoder:
    """``AudioChunk`` events in, bytes of ``fmt`` out as they come: encoded chunks pass through, sample
    chunks go through one ``AudioEncoder`` (made on the first, at its rate and residual tempo)."""

    def __init__(self, fmt: str, out_rate: int | None = None) -> None:
        self.fmt, self.out_rate = fmt, out_rate
        self.encoder: AudioEncoder | None = None

    def feed(self, chunk: AudioChunk) -> bytes:
        if chunk.encoded is not None:
            return chunk.encoded
        if chunk.samples is None or chunk.sample_rate is None:
            raise ValueError("an audio chunk without samples and a sample rate, or encoded bytes")
        if self.encoder is None:
            self.encoder = AudioEncoder(self.fmt, chunk.sample_rate, self.out_rate, chunk.residual_tempo)
        return self.encoder.feed(chunk.samples)

    def finish(self) -> bytes:
        return self.encoder.finish() if self.encoder is not None else b""

    @property
    def seconds_out(self) -> float:
        """Seconds of audio this encoder has written (0 for passed-through bytes, whose length it does not know)."""
        return self.encoder.samples_out / self.encoder.out_rate if self.encoder is not None else 0.0


def audio_bytes(chunk: AudioChunk, fmt: str) -> bytes:
    """One whole piece in ``fmt`` at its own rate (music): encoded bytes as they came, else encoded here."""
    encoder = ChunkEncoder(fmt)
    data = encoder.feed(chunk) + encoder.finish()
    return sized_wav(data) if fmt == "wav" and chunk.encoded is None else data
