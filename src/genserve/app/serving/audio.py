"""Audio: speech streamed as it is spoken, and music composed, rendered and encoded.

Speech checks everything it can before the first byte (model, voice, length, format), then waits
for the first chunk of audio, so a full queue or a failing model is still an HTTP error and not a
cut-off 200; after that, encoded bytes go out as each chunk of audio comes. Audio past the model's
``limits.max_audio_seconds`` is cut off and logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from genserve.app.backends.manager import ModelManager
from genserve.app.errors import InvalidRequestError
from genserve.app.metrics import Metrics
from genserve.app.schemas.audio import MusicRequest, SpeechRequest
from genserve.app.serving.common import Deadline, seed_or_random, unless_disconnected
from genserve.app.settings import Settings
from genserve.models.audio import SpeechSpec
from genserve.models.audio.codec import FORMATS, OUTPUT_RATE, AudioEncoder, encode

log = logging.getLogger(__name__)
SEED_HEADER = "x-genserve-seed"
MUSIC_MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "mid": "audio/midi"}


class AudioServing:
    def __init__(self, manager: ModelManager, metrics: Metrics, settings: Settings) -> None:
        self.manager, self.metrics, self.settings = manager, metrics, settings

    # speech -----------------------------------------------------------------------------------
    async def speech(self, body: SpeechRequest, raw: Request) -> Response:
        backend = self.manager.get(body.model, "speech")
        limits = backend.entry.limits
        if len(body.input) > limits.max_input_chars:
            raise InvalidRequestError(f"input has {len(body.input)} characters; this model accepts at most "
                                      f"{limits.max_input_chars}.", param="input")
        if body.instructions is not None:
            raise InvalidRequestError(f"The model '{body.model}' does not take instructions.",
                                      param="instructions")
        try:
            voice = backend.resolve_voice(body.voice)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="voice") from None
        spec = SpeechSpec(body.input, voice, body.speed, body.seed)
        encoder = AudioEncoder(body.response_format, backend.sample_rate, OUTPUT_RATE,
                               backend.residual_tempo(body.speed))
        deadline = Deadline.start(backend.entry.timeout_s(self.settings.request_timeout_s))
        chunks = deadline.stream(backend.speak(spec))
        started = time.perf_counter()
        try:
            first = await anext(chunks)
        except StopAsyncIteration:  # nothing to say (only punctuation, say): a valid empty file
            first = np.zeros(0, dtype=np.float32)
        stream = self._encode_speech(body, first, chunks, encoder, started, limits.max_audio_seconds,
                                     backend.sample_rate)
        return StreamingResponse(stream, media_type=FORMATS[body.response_format].media_type)

    async def _encode_speech(self, body: SpeechRequest, first: np.ndarray, rest: AsyncIterator[np.ndarray],
                             encoder: AudioEncoder, started: float, cap_s: float, rate: int) -> AsyncIterator[bytes]:
        cap, produced = int(cap_s * rate), 0
        try:
            chunk: np.ndarray | None = first
            while chunk is not None:
                if produced + len(chunk) > cap:
                    log.warning("speech for %s cut off at %.0f s (limits.max_audio_seconds)", body.model, cap_s)
                    chunk = chunk[: cap - produced]
                produced += len(chunk)
                if data := await asyncio.to_thread(encoder.feed, chunk):
                    yield data
                chunk = await anext(rest, None) if produced < cap else None
            yield await asyncio.to_thread(encoder.finish)
        finally:
            await rest.aclose()  # type: ignore[attr-defined]
            self._observe(body.model, encoder.samples_out / OUTPUT_RATE, time.perf_counter() - started)

    # music ------------------------------------------------------------------------------------
    async def music(self, body: MusicRequest, raw: Request) -> Response:
        backend = self.manager.get(body.model, "music")
        from genserve.models.music import MusicSpec, render  # a music model is loaded: so is this
        from genserve.models.music.midi import to_midi

        cap = backend.entry.limits.max_audio_seconds
        if body.seconds > cap:
            raise InvalidRequestError(f"seconds={body.seconds:g} exceeds this model's limit of {cap:g}.",
                                      param="seconds")
        try:
            backend.parse_key(body.key)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="key") from None
        seed = seed_or_random(body.seed)
        spec = MusicSpec(seconds=body.seconds, tempo=body.tempo, key=body.key, temperature=body.temperature,
                         seed=seed)
        deadline = Deadline.start(backend.entry.timeout_s(self.settings.request_timeout_s))
        started = time.perf_counter()

        def encode_piece(piece: Any) -> bytes:
            if body.response_format == "mid":
                return to_midi(piece)
            return encode(render(piece, backend.sample_rate), body.response_format, backend.sample_rate)

        async def run() -> Response:
            piece = await deadline.run(backend.compose(spec))
            data = await asyncio.to_thread(encode_piece, piece)
            self._observe(body.model, body.seconds, time.perf_counter() - started)
            return Response(data, media_type=MUSIC_MEDIA_TYPES[body.response_format],
                            headers={SEED_HEADER: str(seed)})

        return await unless_disconnected(raw, run())

    def _observe(self, model: str, audio_seconds: float, wall_seconds: float) -> None:
        if audio_seconds > 0:
            self.metrics.audio_seconds.labels(model).inc(audio_seconds)
            self.metrics.audio_real_time_factor.labels(model).observe(wall_seconds / audio_seconds)
